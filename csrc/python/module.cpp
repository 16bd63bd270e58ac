// The Python module resnet_deploy._C: importing it loads this library, whose TORCH_LIBRARY blocks register
// the operators; it also tells how the library was built, and holds the eager-mode entry of batch_norm_add_relu.
#include <torch/extension.h>

#include "cpu/channel_lanes.h"
#include "cpu/streaming_stores.h"
#include "eager_call.h"

#ifndef RESNET_DEPLOY_CUDA_ARCHS
#define RESNET_DEPLOY_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_deploy operators (torch.ops.resnet_deploy.*), and the eager-mode entry of batch_norm_add_relu";
  m.def("build_info", [] {
    pybind11::dict info;
    info["cuda"] = static_cast<bool>(RESNET_DEPLOY_WITH_CUDA);
    info["cuda_archs"] = std::string(RESNET_DEPLOY_CUDA_ARCHS);
    info["torch"] = std::string(RESNET_DEPLOY_TORCH_VERSION);
#ifdef _OPENMP
    info["openmp"] = true;  // at::parallel_for only runs threads in code compiled with OpenMP
#else
    info["openmp"] = false;
#endif
    return info;
  });
  m.def("cpu_kernels", [] {
    pybind11::dict info;
    info["level"] = std::string(resnet_deploy::cpu_kernel_level());
    // Lanes of the small NCHW planes' walk for a channel count that is a multiple of 16 (0: rows of repeated values).
    info["small_plane_lanes"] = resnet_deploy::lane_width(16);
    info["streaming_min_bytes"] = resnet_deploy::streaming_min_bytes();
    return info;
  }, "which CPU kernels run on this CPU: instruction-set level, small-plane lanes, streaming-store threshold");
  // Without the GIL while the kernels run, as torch's own operators, so other Python threads go on.
  m.def("batch_norm_add_relu", &resnet_deploy::batch_norm_add_relu_eager, pybind11::arg("input"),
        pybind11::arg("residual"), pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("training"), pybind11::arg("momentum"), pybind11::arg("eps"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "resnet_deploy.ops.batch_norm_add_relu in eager mode: the operators called through the dispatcher directly");
  m.def("streaming_min_bytes", &resnet_deploy::streaming_min_bytes,
        "float32 CPU outputs of at least this many bytes are written with streaming stores (negative: none)");
  m.def("set_streaming_min_bytes", &resnet_deploy::set_streaming_min_bytes, pybind11::arg("bytes"),
        "sets the streaming-store threshold for this process; returns the previous one");
}
