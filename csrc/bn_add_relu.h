// Per-element math of the fused BatchNorm + residual add + ReLU, shared by the CPU and CUDA kernels so the
// CPU tests exercise the exact expressions the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, as on the device: the CPU kernels' loops compiled with other optimization options (reordered
// sums) must still inline them.
#define RD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define RD_HOST_DEVICE inline
#endif

namespace resnet_deploy {

// Shape of the kernels' iteration: NCHW walks N*C planes of HW; channels_last walks N*HW rows of C.
struct Geometry {
  int64_t batch;
  int64_t channels;
  int64_t plane;  // H * W
  bool channels_last;
  RD_HOST_DEVICE int64_t per_channel() const { return batch * plane; }
};

// invstd = 1 / sqrt(var + eps), with a variance that rounding pushed below zero clamped to zero. Written so that a
// NaN variance (a NaN or infinite input) stays NaN, as in PyTorch, instead of becoming a finite 1 / sqrt(eps).
template <typename acc_t>
RD_HOST_DEVICE acc_t inverse_std(acc_t var, double eps) {
  return acc_t(1) / std::sqrt((var < acc_t(0) ? acc_t(0) : var) + static_cast<acc_t>(eps));
}

// Mean and biased variance of a channel from sums of (x - shift) and (x - shift)^2; the shift (any value of
// the channel) keeps the sums small so the one-pass formula does not cancel catastrophically.
template <typename acc_t>
struct MeanVar {
  acc_t mean;
  acc_t var;
};

template <typename acc_t>
RD_HOST_DEVICE MeanVar<acc_t> mean_var_from_shifted_sums(double sum, double sum_sq, double count, acc_t shift) {
  const double shifted_mean = sum / count;
  const double var = sum_sq / count - shifted_mean * shifted_mean;
  return {static_cast<acc_t>(shift + shifted_mean), static_cast<acc_t>(var < 0 ? 0 : var)};  // NaN stays NaN
}

// BatchNorm as a per-channel affine map: bn(x) = x * scale + shift.
template <typename acc_t>
struct ChannelAffine {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
RD_HOST_DEVICE ChannelAffine<acc_t> bn_affine(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  const acc_t scale = weight * invstd;
  return {scale, bias - mean * scale};
}

// Written as a comparison (not fmax) so that NaN propagates, as torch.relu does. The ReLU functions write zero as
// acc_t{} so that acc_t may also be a GCC vector type (cpu/channel_lanes.h), compared and selected lane by lane.
template <typename acc_t>
RD_HOST_DEVICE acc_t relu(acc_t v) {
  return v < acc_t{} ? acc_t{} : v;
}

template <typename acc_t>
RD_HOST_DEVICE acc_t bn_add_relu_forward(acc_t x, acc_t residual, acc_t scale, acc_t shift) {
  return relu(x * scale + shift + residual);
}

// dL/dz for z = bn(x) + residual, read from the saved output: out > 0 exactly where z > 0.
template <typename acc_t>
RD_HOST_DEVICE acc_t relu_backward(acc_t grad_out, acc_t out) {
  return out > acc_t{} ? grad_out : acc_t{};
}

// The same, for a forward without residual, from its input instead of its output, which spares the backward
// reading `out` (it reads the input anyway). out = relu(x * scale + shift + 0) > 0 exactly where
// x * scale + shift > 0 (NaN and -0 included), before rounding to the tensor's dtype (no rounding in float32 and
// float64). One comparison, not relu's and then this one's: scalar code compiles each into a branch.
template <typename acc_t>
RD_HOST_DEVICE acc_t relu_backward_from_input(acc_t grad_out, acc_t x, acc_t scale, acc_t shift) {
  return x * scale + shift > acc_t{} ? grad_out : acc_t{};
}

// The input gradient is a per-channel affine function of (dz, x): dx = a * dz + b * x + c.
//   training: dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)),  xhat = (x - mean) * invstd
//   eval:     dx = w * invstd * dz   (the running statistics are constants)
template <typename acc_t>
struct InputGradCoeffs {
  acc_t a;
  acc_t b;
  acc_t c;
};

// sum_dz = sum(dz), sum_dz_xmu = sum(dz * (x - mean)) over the channel's `count` elements.
template <typename acc_t>
RD_HOST_DEVICE InputGradCoeffs<acc_t> input_grad_coeffs(acc_t mean, acc_t invstd, acc_t weight, acc_t sum_dz,
                                                        acc_t sum_dz_xmu, acc_t count, bool training) {
  const acc_t a = weight * invstd;
  if (!training) {
    return {a, acc_t(0), acc_t(0)};
  }
  const acc_t mean_dz = sum_dz / count;
  const acc_t b = -a * invstd * invstd * (sum_dz_xmu / count);
  return {a, b, -a * mean_dz - b * mean};
}

template <typename acc_t>
RD_HOST_DEVICE acc_t bn_input_grad(acc_t dz, acc_t x, InputGradCoeffs<acc_t> k) {
  return k.a * dz + k.b * x + k.c;
}

// Parameter gradients from the same sums: d weight = sum(dz * xhat), d bias = sum(dz).
template <typename acc_t>
RD_HOST_DEVICE acc_t weight_grad(acc_t sum_dz_xmu, acc_t invstd) {
  return sum_dz_xmu * invstd;
}

// Running statistics: the unbiased batch variance from the inverse std of `count` values, and the
// exponential moving average that nn.BatchNorm2d keeps.
RD_HOST_DEVICE double unbiased_var_from_invstd(double invstd, double eps, int64_t count) {
  const double biased = 1.0 / (invstd * invstd) - eps;
  return biased * static_cast<double>(count) / static_cast<double>(count - 1);
}

RD_HOST_DEVICE double moving_average(double running, double batch, double momentum) {
  return (1.0 - momentum) * running + momentum * batch;
}

}  // namespace resnet_deploy
