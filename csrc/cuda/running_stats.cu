// CUDA kernel of bn_update_running_stats, on the current stream: one thread per channel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_add_relu.h"
#include "bn_add_relu_args.h"

namespace resnet_deploy {
namespace {

template <typename scalar_t>
__global__ void update_running_stats_kernel(scalar_t* running_mean, int64_t mean_stride, scalar_t* running_var,
                                            int64_t var_stride, const double* mean, const double* invstd,
                                            int64_t channels, double momentum, double eps, int64_t count) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  scalar_t& rm = running_mean[c * mean_stride];
  scalar_t& rv = running_var[c * var_stride];
  rm = static_cast<scalar_t>(moving_average(static_cast<double>(rm), mean[c], momentum));
  rv = static_cast<scalar_t>(
      moving_average(static_cast<double>(rv), unbiased_var_from_invstd(invstd[c], eps, count), momentum));
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  check_running_stats_update(running_mean, running_var, mean, invstd, count);
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const at::Tensor batch_mean = mean.to(at::kDouble).contiguous();
  const at::Tensor batch_invstd = invstd.to(at::kDouble).contiguous();
  const int64_t channels = running_mean.size(0);
  if (channels == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>((channels + kThreads - 1) / kThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_update_running_stats", [&] {
    update_running_stats_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        running_mean.data_ptr<scalar_t>(), running_mean.stride(0), running_var.data_ptr<scalar_t>(),
        running_var.stride(0), batch_mean.data_ptr<double>(), batch_invstd.data_ptr<double>(), channels, momentum,
        eps, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, CUDA, m) {
  m.impl("bn_update_running_stats", &bn_update_running_stats_cuda);
}

}  // namespace resnet_deploy
