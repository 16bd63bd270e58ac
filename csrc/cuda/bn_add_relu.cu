// CUDA kernels of the fused BatchNorm + residual add + ReLU, on the current stream. They call the same
// per-element functions (bn_add_relu.h) as the CPU kernels. One block reduces one channel; elementwise
// kernels walk memory order with a grid-stride loop and find the channel from the layout.
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h would need the cuBLAS/cuSPARSE headers too).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_add_relu.h"
#include "bn_add_relu_args.h"

namespace resnet_deploy {
namespace {

constexpr int kThreads = 256;

// Index of the j-th element (0 <= j < N*H*W) of channel c in memory.
__device__ __forceinline__ int64_t element_index(const Geometry& g, int64_t j, int64_t c) {
  if (g.channels_last) return j * g.channels + c;
  const int64_t n = j / g.plane;
  return (n * g.channels + c) * g.plane + (j - n * g.plane);
}

__device__ __forceinline__ int64_t channel_of(const Geometry& g, int64_t i) {
  return g.channels_last ? i % g.channels : (i / g.plane) % g.channels;
}

// Block-wide sum of two values per thread, in double; the result is valid in thread 0.
__device__ void block_sum2(double& a, double& b) {
  __shared__ double shared_a[kThreads];
  __shared__ double shared_b[kThreads];
  shared_a[threadIdx.x] = a;
  shared_b[threadIdx.x] = b;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared_a[threadIdx.x] += shared_a[threadIdx.x + stride];
      shared_b[threadIdx.x] += shared_b[threadIdx.x + stride];
    }
    __syncthreads();
  }
  a = shared_a[0];
  b = shared_b[0];
}

// Per channel (one block each): mean and inverse std from sums shifted by the channel's first value.
template <typename scalar_t, typename acc_t>
__global__ void batch_stats_kernel(Geometry g, const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                                   acc_t* __restrict__ invstd, double eps) {
  const int64_t c = blockIdx.x;
  const acc_t shift = static_cast<acc_t>(x[element_index(g, 0, c)]);
  acc_t sum = 0, sum_sq = 0;
  for (int64_t j = threadIdx.x; j < g.per_channel(); j += blockDim.x) {
    const acc_t d = static_cast<acc_t>(x[element_index(g, j, c)]) - shift;
    sum += d;
    sum_sq += d * d;
  }
  double total = sum, total_sq = sum_sq;
  block_sum2(total, total_sq);
  if (threadIdx.x == 0) {
    const MeanVar<acc_t> mv = mean_var_from_shifted_sums<acc_t>(total, total_sq, double(g.per_channel()), shift);
    mean[c] = mv.mean;
    invstd[c] = inverse_std<acc_t>(mv.var, eps);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_add_relu_kernel(Geometry g, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ residual, const acc_t* __restrict__ mean,
                                          const acc_t* __restrict__ invstd, const acc_t* __restrict__ weight,
                                          const acc_t* __restrict__ bias, scalar_t* __restrict__ y, int64_t numel) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(g, i);
    const ChannelAffine<acc_t> affine = bn_affine(mean[c], invstd[c], weight[c], bias[c]);
    const acc_t r = residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0);
    y[i] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(x[i]), r, affine.scale, affine.shift));
  }
}

// dz of element i (channel c, input value x) behind the ReLU: the mask from `out`, or, when out is null (a forward
// without residual), from the input through the forward's affine map (bias is read only then).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_behind_relu(const scalar_t* __restrict__ grad_out,
                                                  const scalar_t* __restrict__ out, int64_t i, int64_t c, acc_t x,
                                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                                  const acc_t* __restrict__ weight, const acc_t* __restrict__ bias) {
  const acc_t g = static_cast<acc_t>(grad_out[i]);
  if (out != nullptr) return relu_backward(g, static_cast<acc_t>(out[i]));
  const ChannelAffine<acc_t> affine = bn_affine(mean[c], invstd[c], weight[c], bias[c]);
  return relu_backward_from_input(g, x, affine.scale, affine.shift);
}

// Per channel (one block each): sum(dz) and sum(dz * (x - mean)), and from them the parameter gradients.
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_kernel(Geometry g, const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                       const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                       acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dz_xmu,
                                       acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias) {
  const int64_t c = blockIdx.x;
  const acc_t mu = mean[c];
  acc_t s0 = 0, s1 = 0;
  for (int64_t j = threadIdx.x; j < g.per_channel(); j += blockDim.x) {
    const int64_t i = element_index(g, j, c);
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t dz = grad_behind_relu(grad_out, out, i, c, xi, mean, invstd, weight, bias);
    s0 += dz;
    s1 += dz * (xi - mu);
  }
  double total_dz = s0, total_dz_xmu = s1;
  block_sum2(total_dz, total_dz_xmu);
  if (threadIdx.x == 0) {
    sum_dz[c] = static_cast<acc_t>(total_dz);
    sum_dz_xmu[c] = static_cast<acc_t>(total_dz_xmu);
    grad_weight[c] = weight_grad<acc_t>(static_cast<acc_t>(total_dz_xmu), invstd[c]);
    grad_bias[c] = static_cast<acc_t>(total_dz);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(Geometry g, const scalar_t* __restrict__ grad_out,
                                            const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                            const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                            const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                            const acc_t* __restrict__ sum_dz, const acc_t* __restrict__ sum_dz_xmu,
                                            bool training, scalar_t* __restrict__ grad_input,
                                            scalar_t* __restrict__ grad_residual, int64_t numel) {
  const acc_t count = static_cast<acc_t>(g.per_channel());
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(g, i);
    const InputGradCoeffs<acc_t> k =
        input_grad_coeffs<acc_t>(mean[c], invstd[c], weight[c], sum_dz[c], sum_dz_xmu[c], count, training);
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t dz = grad_behind_relu(grad_out, out, i, c, xi, mean, invstd, weight, bias);
    grad_input[i] = static_cast<scalar_t>(bn_input_grad(dz, xi, k));
    if (grad_residual != nullptr) grad_residual[i] = static_cast<scalar_t>(dz);
  }
}

int elementwise_blocks(int64_t numel) {
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t max_blocks = int64_t(multiprocessors) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks)));
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr;
}

void launch_normalize_add_relu(const ForwardArgs& a, const at::Tensor& mean, const at::Tensor& invstd,
                               at::Tensor& out) {
  const int64_t numel = a.input.numel();
  if (numel == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "bn_add_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_add_relu_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        a.geom, a.input.data_ptr<scalar_t>(), data_or_null<scalar_t>(a.residual), mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>(), a.weight.data_ptr<acc_t>(), a.bias.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
        numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_cuda(const at::Tensor& input,
                                                                      const std::optional<at::Tensor>& residual,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_train", input, residual, weight, bias);
  check_training_count("bn_add_relu_train", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto stats_options = input.options().dtype(stats_dtype(input));
  at::Tensor mean = at::empty({a.geom.channels}, stats_options);
  at::Tensor invstd = at::empty({a.geom.channels}, stats_options);
  at::Tensor out = at::empty_like(a.input, a.format);
  if (a.input.numel() == 0) {  // no values: an empty output, and statistics of nothing (NaN), as on the CPU
    mean.fill_(NAN);
    invstd.fill_(NAN);
    return {out, mean, invstd};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats_kernel<scalar_t, acc_t><<<a.geom.channels, kThreads, 0, stream>>>(
        a.geom, a.input.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_normalize_add_relu(a, mean, invstd, out);
  return {out, mean, invstd};
}

at::Tensor bn_add_relu_eval_cuda(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                 const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_eval", input, residual, weight, bias);
  check_channel_param("bn_add_relu_eval", input, running_mean, "running_mean");
  check_channel_param("bn_add_relu_eval", input, running_var, "running_var");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor mean = channel_vector(running_mean, input, 0.0);
  // Same clamp-and-rsqrt as inverse_std(), on a vector of C values.
  const at::Tensor invstd = channel_vector(running_var, input, 1.0).clamp_min(0).add(eps).rsqrt();
  at::Tensor out = at::empty_like(a.input, a.format);
  launch_normalize_add_relu(a, mean, invstd, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    bool training, bool residual_grad) {
  const BackwardArgs a =
      prepare_backward("bn_add_relu_backward", grad_out, out, input, mean, invstd, weight, bias, residual_grad);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t channels = a.geom.channels;
  const int64_t numel = a.input.numel();
  at::Tensor grad_input = at::empty_like(a.input, a.format);
  at::Tensor grad_residual = residual_grad ? at::empty_like(a.input, a.format) : at::empty({0}, input.options());
  at::Tensor sum_dz = at::zeros({channels}, a.mean.options());
  at::Tensor sum_dz_xmu = at::zeros({channels}, a.mean.options());
  at::Tensor grad_weight = at::zeros({channels}, a.mean.options());
  at::Tensor grad_bias = at::zeros({channels}, a.mean.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* out_or_null = data_or_null<scalar_t>(a.out);  // null: the mask comes from the input
      const acc_t* bias_or_null = data_or_null<acc_t>(a.bias);
      backward_reduce_kernel<scalar_t, acc_t><<<channels, kThreads, 0, stream>>>(
          a.geom, a.grad_out.data_ptr<scalar_t>(), out_or_null, a.input.data_ptr<scalar_t>(),
          a.mean.data_ptr<acc_t>(), a.invstd.data_ptr<acc_t>(), a.weight.data_ptr<acc_t>(), bias_or_null,
          sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>(), grad_weight.data_ptr<acc_t>(),
          grad_bias.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_elementwise_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          a.geom, a.grad_out.data_ptr<scalar_t>(), out_or_null, a.input.data_ptr<scalar_t>(),
          a.mean.data_ptr<acc_t>(), a.invstd.data_ptr<acc_t>(), a.weight.data_ptr<acc_t>(), bias_or_null,
          sum_dz.data_ptr<acc_t>(), sum_dz_xmu.data_ptr<acc_t>(), training, grad_input.data_ptr<scalar_t>(),
          residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto param_dtype = param_grad_dtype(input, weight);
  return {grad_input, grad_residual, grad_weight.to(param_dtype), grad_bias.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, CUDA, m) {
  m.impl("bn_add_relu_train", &bn_add_relu_train_cuda);
  m.impl("bn_add_relu_eval", &bn_add_relu_eval_cuda);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cuda);
}

}  // namespace resnet_deploy
