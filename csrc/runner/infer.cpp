// resnet_deploy_infer: batched inference of an exported model.torchscript.pt, without Python.
//
//   resnet_deploy_infer MODEL.pt --images t10k-images-idx3-ubyte.gz [--labels t10k-labels-idx1-ubyte.gz]
//   resnet_deploy_infer MODEL.pt --raw inputs.f32
//   options: --batch-size N (64)  --warmup N (2)  --threads N  --device cpu|cuda  --predictions FILE
//            --system-malloc (keep glibc's malloc defaults; by default freed memory is kept for reuse)
//
// idx images are pre-processed as resnet_deploy.data.preprocess does: pixels / 255, bilinear antialiased
// resize when the size differs, then (x - mean) / std, with the input shape, mean and std that
// `resnet-deploy export` stored in the model (the values of manifest.json). A raw file holds pre-processed
// float32 inputs (N, C, H, W) in native byte order. Prints accuracy (with --labels), model latency per
// batch and the first predictions; --predictions writes one predicted class index per line.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/cuda.h>
#include <torch/nn/functional/upsampling.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "idx.h"
#include "malloc_settings.h"

namespace {

const char* const kUsage =
    "usage: resnet_deploy_infer MODEL.pt (--images IDX [--labels IDX] | --raw FILE.f32) [--batch-size N]\n"
    "                           [--warmup N] [--threads N] [--device cpu|cuda] [--predictions FILE]\n"
    "                           [--system-malloc]\n";

struct Options {
  std::string model;
  std::string images, labels, raw, predictions;
  int64_t batch_size = 64;
  int64_t warmup = 2;
  int threads = 0;  // 0: libtorch's default
  std::string device = "cpu";
  bool system_malloc = false;
};

// A user error: printed as one line, exit status 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t positive_int(const std::string& flag, const std::string& value, int64_t minimum) {
  size_t used = 0;
  int64_t n = -1;
  try {
    n = std::stoll(value, &used);
  } catch (const std::exception&) {
  }
  if (used != value.size() || n < minimum) {
    throw UsageError(flag + " must be an integer of at least " + std::to_string(minimum) + ", got '" + value + "'");
  }
  return n;
}

// The cores this process may run on: its CPU affinity on Linux, the machine's count elsewhere.
int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg == "--system-malloc") {
      o.system_malloc = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0) {
      if (!o.model.empty()) throw UsageError("unexpected argument '" + arg + "'; expected one MODEL.pt");
      o.model = arg;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--images") o.images = value;
    else if (arg == "--labels") o.labels = value;
    else if (arg == "--raw") o.raw = value;
    else if (arg == "--predictions") o.predictions = value;
    else if (arg == "--batch-size") o.batch_size = positive_int(arg, value, 1);
    else if (arg == "--warmup") o.warmup = positive_int(arg, value, 0);
    else if (arg == "--threads") {
      // Checked before narrowing to int: more threads than cores only slow inference down, and thousands
      // crash libtorch's thread pool.
      const int64_t threads = positive_int(arg, value, 1);
      if (threads > available_cores()) {
        throw UsageError("--threads must be at most " + std::to_string(available_cores()) +
                         ", the cores this process may use, got " + value);
      }
      o.threads = static_cast<int>(threads);
    }
    else if (arg == "--device") o.device = value;
    else throw UsageError("unknown option " + arg);
  }
  if (o.model.empty()) throw UsageError("no MODEL.pt given");
  if (o.images.empty() == o.raw.empty()) throw UsageError("give exactly one of --images IDX and --raw FILE.f32");
  if (!o.labels.empty() && o.images.empty()) throw UsageError("--labels goes with --images");
  if (o.device != "cpu" && o.device != "cuda") throw UsageError("--device must be cpu or cuda, got " + o.device);
  return o;
}

// What the export stored in the model: the input shape (C, H, W), normalization and class names.
struct InputSpec {
  std::vector<int64_t> shape;
  double mean = 0, std = 1;
  std::vector<std::string> classes;
};

InputSpec input_spec(const torch::jit::Module& model, const std::string& path) {
  for (const char* name : {"input_shape", "input_mean", "input_std", "class_names"}) {
    if (!model.hasattr(name)) {
      throw UsageError(path + " has no attribute '" + name + "'; expected a model.torchscript.pt written by " +
                       "`resnet-deploy export`");
    }
  }
  InputSpec spec;
  spec.shape = model.attr("input_shape").toIntVector();
  spec.mean = model.attr("input_mean").toDouble();
  spec.std = model.attr("input_std").toDouble();
  for (const auto& name : model.attr("class_names").toListRef()) spec.classes.push_back(name.toStringRef());
  return spec;
}

// uint8 images (N, H, W) -> float32 (N, C, H', W'), step for step as resnet_deploy.data.preprocess, so the
// inputs are bitwise the ones Python computes.
at::Tensor preprocess(const at::Tensor& images, const InputSpec& spec) {
  if (spec.shape[0] != 1) {
    throw UsageError("the model expects " + std::to_string(spec.shape[0]) +
                     " input channels but idx images have 1; pass pre-processed inputs with --raw");
  }
  at::Tensor x = images.unsqueeze(1).to(at::kFloat).div_(255);
  if (x.size(2) != spec.shape[1] || x.size(3) != spec.shape[2]) {
    namespace F = torch::nn::functional;
    x = F::interpolate(x, F::InterpolateFuncOptions()
                              .size(std::vector<int64_t>{spec.shape[1], spec.shape[2]})
                              .mode(torch::kBilinear)
                              .align_corners(false)
                              .antialias(true));
  }
  return x.sub_(spec.mean).div_(spec.std);
}

// Pre-processed float32 inputs (N, C, H, W) from a raw file.
at::Tensor read_raw(const std::string& path, const InputSpec& spec) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw UsageError(path + " cannot be opened; expected a raw float32 file");
  const int64_t per_image = spec.shape[0] * spec.shape[1] * spec.shape[2];
  const auto bytes = static_cast<int64_t>(std::filesystem::file_size(path));
  const int64_t image_bytes = per_image * static_cast<int64_t>(sizeof(float));
  if (bytes == 0 || bytes % image_bytes != 0) {
    throw UsageError(path + " is " + std::to_string(bytes) + " bytes; expected a positive multiple of " +
                     std::to_string(image_bytes) + " (float32 images of shape " + std::to_string(spec.shape[0]) +
                     "x" + std::to_string(spec.shape[1]) + "x" + std::to_string(spec.shape[2]) + ")");
  }
  at::Tensor x = at::empty({bytes / image_bytes, spec.shape[0], spec.shape[1], spec.shape[2]}, at::kFloat);
  file.read(reinterpret_cast<char*>(x.data_ptr<float>()), bytes);
  return x;
}

double percentile(std::vector<double> sorted, double p) {  // nearest rank
  std::sort(sorted.begin(), sorted.end());
  const auto rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
  return sorted[std::max<size_t>(rank, 1) - 1];
}

int run(const Options& o) {
  // The model calls resnet_deploy::* operators: without the operator library torch::jit::load fails with
  // "Unknown builtin op"; say so plainly instead.
  if (!c10::Dispatcher::singleton().findSchema({"resnet_deploy::bn_add_relu_eval", ""}).has_value()) {
    throw UsageError("the resnet_deploy operator library is not loaded; link libresnet_deploy_ops.so with "
                     "-Wl,--no-as-needed (as CMakeLists.txt does) or dlopen it before loading the model");
  }
  if (o.threads > 0) at::set_num_threads(o.threads);
  if (o.device == "cuda" && !torch::cuda::is_available()) {
    throw UsageError("--device cuda, but libtorch sees no CUDA device; use --device cpu");
  }
  const torch::Device device(o.device);
  if (!std::filesystem::is_regular_file(o.model)) throw UsageError("no model at " + o.model);
  torch::jit::Module model = torch::jit::load(o.model, device);
  model.eval();
  const InputSpec spec = input_spec(model, o.model);

  at::Tensor inputs = o.raw.empty() ? preprocess(resnet_deploy::read_idx(o.images, 3), spec) : read_raw(o.raw, spec);
  const int64_t count = inputs.size(0);
  if (count == 0) throw UsageError("no images in " + (o.raw.empty() ? o.images : o.raw) + "; nothing to predict");
  if (inputs.sizes().slice(1) != at::IntArrayRef(spec.shape)) {
    throw UsageError("images are " + std::to_string(inputs.size(2)) + "x" + std::to_string(inputs.size(3)) +
                     " after pre-processing but the model expects " + std::to_string(spec.shape[1]) + "x" +
                     std::to_string(spec.shape[2]));
  }
  std::optional<at::Tensor> labels;
  if (!o.labels.empty()) {
    labels = resnet_deploy::read_idx(o.labels, 1).to(at::kLong);
    if (labels->size(0) != count) {
      throw UsageError(o.labels + " holds " + std::to_string(labels->size(0)) + " labels but there are " +
                       std::to_string(count) + " images; expected one label per image");
    }
  }

  c10::InferenceMode inference_mode;
  auto forward = [&](const at::Tensor& batch) {
    at::Tensor logits = model.forward({batch.to(device)}).toTensor();
    if (device.is_cuda()) torch::cuda::synchronize();
    return logits;
  };
  for (int64_t i = 0; i < o.warmup; ++i) forward(inputs.slice(0, 0, std::min(o.batch_size, count)));

  std::vector<at::Tensor> predictions;
  std::vector<double> batch_ms;
  for (int64_t start = 0; start < count; start += o.batch_size) {
    const at::Tensor batch = inputs.slice(0, start, std::min(start + o.batch_size, count));
    const auto begin = std::chrono::steady_clock::now();
    const at::Tensor logits = forward(batch);
    batch_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count());
    predictions.push_back(logits.argmax(1).cpu());
  }
  const at::Tensor predicted = at::cat(predictions);

  const double total_ms = std::accumulate(batch_ms.begin(), batch_ms.end(), 0.0);
  std::printf("model: %s (input %" PRId64 "x%" PRId64 "x%" PRId64 ", mean %.4f, std %.4f, %zu classes)"
              " on %s, threads %d\n", o.model.c_str(), spec.shape[0], spec.shape[1], spec.shape[2], spec.mean, spec.std,
              spec.classes.size(), o.device.c_str(), at::get_num_threads());
  std::printf("images: %" PRId64 " from %s, batch size %" PRId64 " (%zu batches, %" PRId64 " warm-up)\n", count,
              (o.raw.empty() ? o.images : o.raw).c_str(), o.batch_size, batch_ms.size(), o.warmup);
  if (labels) {
    const int64_t correct = predicted.eq(*labels).sum().item<int64_t>();
    std::printf("accuracy: %.4f (%" PRId64 "/%" PRId64 ")\n", double(correct) / count, correct, count);
  }
  std::printf("latency per batch (ms): p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", percentile(batch_ms, 50),
              percentile(batch_ms, 90), percentile(batch_ms, 99), percentile(batch_ms, 100));
  std::printf("throughput: %.1f images/s\n", count / (total_ms / 1000.0));
  const auto* p = predicted.data_ptr<int64_t>();
  std::string first;
  for (int64_t i = 0; i < std::min<int64_t>(count, 5); ++i) {
    first += (i ? ", " : "") + std::to_string(p[i]) + " " + spec.classes.at(p[i]);
  }
  std::printf("first predictions: %s\n", first.c_str());
  if (!o.predictions.empty()) {
    std::ofstream out(o.predictions);
    for (int64_t i = 0; i < count; ++i) out << p[i] << '\n';
    if (!out) throw UsageError("cannot write predictions to " + o.predictions);
    std::printf("predictions: %s\n", o.predictions.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse(argc, argv);
    const std::string malloc_setting = options.system_malloc ? "system" : resnet_deploy::retain_freed_memory();
    std::printf("malloc: %s\n", malloc_setting.c_str());
    return run(options);
  } catch (const UsageError& error) {
    std::cerr << "resnet_deploy_infer: error: " << error.what() << "\n" << kUsage;
  } catch (const c10::Error& error) {  // from libtorch: loading or running the model
    std::cerr << "resnet_deploy_infer: error: " << error.what_without_backtrace() << "\n";
  } catch (const std::exception& error) {  // from the idx reader
    std::cerr << "resnet_deploy_infer: error: " << error.what() << "\n";
  }
  return 1;
}
