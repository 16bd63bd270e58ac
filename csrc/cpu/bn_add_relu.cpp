// CPU kernels of the fused BatchNorm + residual add + ReLU. Two passes forward in training (statistics,
// then normalize-add-relu), two passes backward (reduction, then elementwise); each walks NCHW planes or
// channels_last rows directly, multi-threaded with at::parallel_for, inner loops vectorized per ISA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

// The lane kernels instantiate the shared math with GCC vector types (cpu/channel_lanes.h), always inlined. GCC's
// note that passing such a vector without AVX changes the calling convention (-Wpsabi) is about calls between
// functions compiled for different instruction sets, which these inlined calls are not.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "bn_add_relu.h"
#include "bn_add_relu_args.h"
#include "cpu/channel_lanes.h"
#include "cpu/streaming_stores.h"

namespace resnet_deploy {
namespace {

// ---- Inner loops ----
// Each walks one NCHW plane (a span of one channel) or a block of channels_last rows (every channel), with no
// calls or structs in the loop body so that it vectorizes. RD_CPU_CLONES compiles each loop for AVX-512, for
// AVX2 and for the baseline, and the loader picks the best the CPU has: one build runs everywhere.
// NCHW kernels take a range of planes (a call per plane costs more than a 3x3 plane's work); the span_*
// functions are their always-inlined bodies for one plane.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RD_CPU_CLONES
#endif
#define RD_ALWAYS_INLINE inline __attribute__((always_inline))
// Sums over one NCHW plane: GCC vectorizes a reordered float sum only with -fassociative-math, and then ends it
// with a few shuffles; an `omp simd reduction` instead adds its lanes one by one through memory, which costs
// more than the loads on a 6x6 plane.
#if defined(__GNUC__) && !defined(__clang__)
#define RD_REORDERED_SUMS __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))
#else
#define RD_REORDERED_SUMS
#endif

// *sum += sum(x - shift), *sum_sq += sum((x - shift)^2) over n contiguous values.
template <typename scalar_t, typename acc_t>
RD_ALWAYS_INLINE RD_REORDERED_SUMS void span_shifted_sums(const scalar_t* __restrict__ x, int64_t n, acc_t shift,
                                                          acc_t* sum, acc_t* sum_sq) {
  acc_t s = 0, ss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - shift;
    s += d;
    ss += d * d;
  }
  *sum += s;
  *sum_sq += ss;
}

// channels_last sums walk kRowsTogether rows per step and add them before touching the per-channel sums: with
// a channel count known only at run time those live in memory, and each row's add would otherwise wait on the
// previous row's store.
constexpr int64_t kRowsTogether = 4;

// The channels_last sums and forward take the channel count as a template argument for the common ResNet widths,
// so that the compiler unrolls a row and keeps the per-channel values in registers; kChannels = 0 reads it at run
// time.
template <typename F>
void with_fixed_channels(int64_t channels, const F& f) {
  if (channels == 64) return f(std::integral_constant<int64_t, 64>{});
  if (channels == 128) return f(std::integral_constant<int64_t, 128>{});
  f(std::integral_constant<int64_t, 0>{});
}

template <typename scalar_t, typename acc_t, int64_t kChannels>
RD_CPU_CLONES void rows_shifted_sums(const scalar_t* __restrict__ x, int64_t rows, int64_t runtime_channels,
                                     const acc_t* __restrict__ shift, acc_t* __restrict__ sum,
                                     acc_t* __restrict__ sum_sq) {
  const int64_t channels = kChannels > 0 ? kChannels : runtime_channels;
  int64_t row = 0;
  for (; row + kRowsTogether <= rows; row += kRowsTogether) {
    const scalar_t* __restrict__ xr = x + row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t d0 = static_cast<acc_t>(xr[c]) - shift[c];
      const acc_t d1 = static_cast<acc_t>(xr[channels + c]) - shift[c];
      const acc_t d2 = static_cast<acc_t>(xr[2 * channels + c]) - shift[c];
      const acc_t d3 = static_cast<acc_t>(xr[3 * channels + c]) - shift[c];
      sum[c] += (d0 + d1) + (d2 + d3);
      sum_sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; row < rows; ++row) {
    const scalar_t* __restrict__ xr = x + row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t d = static_cast<acc_t>(xr[c]) - shift[c];
      sum[c] += d;
      sum_sq[c] += d * d;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kResidual>
RD_ALWAYS_INLINE void span_forward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                scalar_t* __restrict__ y, int64_t n, acc_t scale, acc_t shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t r = kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    y[i] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(x[i]), r, scale, shift));
  }
}

// p + offset, or null for a tensor the pass does not read or write.
template <typename T>
T* at_offset(T* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
}

// `columns` values of each of `rows` rows that start `stride` values apart.
template <typename scalar_t, typename acc_t, bool kResidual>
RD_ALWAYS_INLINE void block_rows_forward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                         scalar_t* __restrict__ y, int64_t rows, int64_t columns, int64_t stride,
                                         const acc_t* __restrict__ scale, const acc_t* __restrict__ shift) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * stride;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const acc_t r = kResidual ? static_cast<acc_t>(residual[base + c]) : acc_t(0);
      y[base + c] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(x[base + c]), r, scale[c], shift[c]));
    }
  }
}

// Small NCHW planes walked as rows make long rows (4,608 columns at 512x3x3) whose per-column values (18 KB each:
// scale and shift, and in the backward's elementwise pass up to five) would come back from L2 for every row: a
// block's rows are walked one tile of columns at a time, so that the tile's values stay in L1 across them.
// (Shorter rows are one tile.)
constexpr int64_t kColumnTile = 1024;

template <typename scalar_t, typename acc_t, bool kResidual, int64_t kChannels>
RD_CPU_CLONES void rows_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t rows,
                                int64_t channels, const acc_t* scale, const acc_t* shift) {
  if constexpr (kChannels > 0) {  // one tile, its width a constant
    block_rows_forward<scalar_t, acc_t, kResidual>(x, residual, y, rows, kChannels, kChannels, scale, shift);
  } else {
    for (int64_t c = 0; c < channels; c += kColumnTile) {
      block_rows_forward<scalar_t, acc_t, kResidual>(x + c, kResidual ? residual + c : nullptr, y + c, rows,
                                                     std::min(kColumnTile, channels - c), channels, scale + c,
                                                     shift + c);
    }
  }
}

// How the backward passes find dz, the gradient behind the ReLU:
//   kOutputMask: from grad_out and the saved output (out > 0);
//   kStoredDz:   the same in the reduction, which also writes dz out (it is the residual's gradient), and the
//                elementwise pass reads dz back instead of grad_out and out;
//   kInputMask:  after a forward without residual, from grad_out and the input, which both passes read anyway,
//                through the forward's scale and shift (relu_backward_from_input): out is not read at all.
enum class Dz { kOutputMask, kStoredDz, kInputMask };

// dz of element i with input value x; out is read only with an output mask, scale and shift used only with the
// input's (the caller passes 0 for them, or null for out, when they are not).
template <Dz kDz, typename scalar_t, typename acc_t>
RD_ALWAYS_INLINE acc_t grad_behind_relu(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                        int64_t i, acc_t x, acc_t scale, acc_t shift) {
  if constexpr (kDz == Dz::kInputMask) {
    return relu_backward_from_input(static_cast<acc_t>(grad_out[i]), x, scale, shift);
  } else {
    return relu_backward(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]));
  }
}

// A per-channel value that only the input mask reads: arrays of it are null otherwise.
template <Dz kDz, typename acc_t>
RD_ALWAYS_INLINE acc_t input_mask_value(const acc_t* values, int64_t c) {
  return kDz == Dz::kInputMask ? values[c] : acc_t(0);
}

// *sum_dz += sum(dz), *sum_dz_xmu += sum(dz * (x - mean)); with kStoredDz, dz is also written to dz_out.
template <typename scalar_t, typename acc_t, Dz kDz>
RD_ALWAYS_INLINE RD_REORDERED_SUMS void span_backward_sums(const scalar_t* __restrict__ grad_out,
                                                           const scalar_t* __restrict__ out,
                                                           const scalar_t* __restrict__ x,
                                                           scalar_t* __restrict__ dz_out, int64_t n, acc_t mean,
                                                           acc_t scale, acc_t shift, acc_t* sum_dz,
                                                           acc_t* sum_dz_xmu) {
  acc_t s0 = 0, s1 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t dz = grad_behind_relu<kDz>(grad_out, out, i, xi, scale, shift);
    if constexpr (kDz == Dz::kStoredDz) dz_out[i] = static_cast<scalar_t>(dz);
    s0 += dz;
    s1 += dz * (xi - mean);
  }
  *sum_dz += s0;
  *sum_dz_xmu += s1;
}

// Element i's terms of the backward sums: returns dz (also written to dz_out[i] with kStoredDz) and sets
// *dz_xmu = dz * (x - mean).
template <typename scalar_t, typename acc_t, Dz kDz>
RD_ALWAYS_INLINE acc_t backward_terms(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                      const scalar_t* __restrict__ x, scalar_t* __restrict__ dz_out, int64_t i,
                                      acc_t mean, acc_t scale, acc_t shift, acc_t* dz_xmu) {
  const acc_t xi = static_cast<acc_t>(x[i]);
  const acc_t dz = grad_behind_relu<kDz>(grad_out, out, i, xi, scale, shift);
  if constexpr (kDz == Dz::kStoredDz) dz_out[i] = static_cast<scalar_t>(dz);
  *dz_xmu = dz * (xi - mean);
  return dz;
}

template <typename scalar_t, typename acc_t, Dz kDz, int64_t kChannels>
RD_CPU_CLONES void rows_backward_sums(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                      const scalar_t* __restrict__ x, scalar_t* __restrict__ dz_out, int64_t rows,
                                      int64_t runtime_channels, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                      acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dz_xmu) {
  const int64_t channels = kChannels > 0 ? kChannels : runtime_channels;
  int64_t row = 0;
  for (; row + kRowsTogether <= rows; row += kRowsTogether) {
    const int64_t base = row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = base + c;
      const acc_t sc = input_mask_value<kDz>(scale, c), sh = input_mask_value<kDz>(shift, c);
      acc_t t0, t1, t2, t3;
      const acc_t dz0 = backward_terms<scalar_t, acc_t, kDz>(grad_out, out, x, dz_out, i, mean[c], sc, sh, &t0);
      const acc_t dz1 =
          backward_terms<scalar_t, acc_t, kDz>(grad_out, out, x, dz_out, i + channels, mean[c], sc, sh, &t1);
      const acc_t dz2 =
          backward_terms<scalar_t, acc_t, kDz>(grad_out, out, x, dz_out, i + 2 * channels, mean[c], sc, sh, &t2);
      const acc_t dz3 =
          backward_terms<scalar_t, acc_t, kDz>(grad_out, out, x, dz_out, i + 3 * channels, mean[c], sc, sh, &t3);
      sum_dz[c] += (dz0 + dz1) + (dz2 + dz3);
      sum_dz_xmu[c] += (t0 + t1) + (t2 + t3);
    }
  }
  for (; row < rows; ++row) {
    const int64_t base = row * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      acc_t t;
      sum_dz[c] += backward_terms<scalar_t, acc_t, kDz>(grad_out, out, x, dz_out, base + c, mean[c],
                                                        input_mask_value<kDz>(scale, c),
                                                        input_mask_value<kDz>(shift, c), &t);
      sum_dz_xmu[c] += t;
    }
  }
}

// dx = a * dz + b * x + c (see input_grad_coeffs); with kStoredDz, grad_out_or_dz holds dz.
template <typename scalar_t, typename acc_t, Dz kDz>
RD_ALWAYS_INLINE void span_backward_apply(const scalar_t* __restrict__ grad_out_or_dz, const scalar_t* __restrict__ out,
                                          const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_input, int64_t n,
                                          acc_t scale, acc_t shift, acc_t a, acc_t b, acc_t c) {
  const InputGradCoeffs<acc_t> k{a, b, c};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t dz = kDz == Dz::kStoredDz ? static_cast<acc_t>(grad_out_or_dz[i])
                                          : grad_behind_relu<kDz>(grad_out_or_dz, out, i, xi, scale, shift);
    grad_input[i] = static_cast<scalar_t>(bn_input_grad(dz, xi, k));
  }
}

template <typename scalar_t, typename acc_t, Dz kDz>
RD_ALWAYS_INLINE void block_rows_backward_apply(const scalar_t* __restrict__ grad_out_or_dz,
                                                const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                                scalar_t* __restrict__ grad_input, int64_t rows, int64_t columns,
                                                int64_t stride, const acc_t* __restrict__ scale,
                                                const acc_t* __restrict__ shift, const acc_t* __restrict__ ka,
                                                const acc_t* __restrict__ kb, const acc_t* __restrict__ kc) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t base = row * stride;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const acc_t xi = static_cast<acc_t>(x[base + c]);
      const acc_t dz = kDz == Dz::kStoredDz
                           ? static_cast<acc_t>(grad_out_or_dz[base + c])
                           : grad_behind_relu<kDz>(grad_out_or_dz, out, base + c, xi,
                                                   input_mask_value<kDz>(scale, c), input_mask_value<kDz>(shift, c));
      grad_input[base + c] = static_cast<scalar_t>(bn_input_grad(dz, xi, {ka[c], kb[c], kc[c]}));
    }
  }
}

template <typename scalar_t, typename acc_t, Dz kDz>
RD_CPU_CLONES void rows_backward_apply(const scalar_t* grad_out_or_dz, const scalar_t* out, const scalar_t* x,
                                       scalar_t* grad_input, int64_t rows, int64_t channels, const acc_t* scale,
                                       const acc_t* shift, const acc_t* ka, const acc_t* kb, const acc_t* kc) {
  for (int64_t c = 0; c < channels; c += kColumnTile) {  // as rows_forward
    block_rows_backward_apply<scalar_t, acc_t, kDz>(grad_out_or_dz + c, at_offset(out, c), x + c, grad_input + c, rows,
                                                    std::min(kColumnTile, channels - c), channels, at_offset(scale, c),
                                                    at_offset(shift, c), ka + c, kb + c, kc + c);
  }
}

// ---- NCHW: planes [begin, end) of N*C, plane p holding channel p % C ----

template <typename scalar_t, typename acc_t>
RD_CPU_CLONES RD_REORDERED_SUMS void planes_shifted_sums(const scalar_t* x, int64_t begin, int64_t end,
                                                         int64_t plane, int64_t channels, const acc_t* shift,
                                                         double* sum, double* sum_sq) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    acc_t s = 0, ss = 0;  // one plane in acc_t, then into double
    span_shifted_sums<scalar_t, acc_t>(x + p * plane, plane, shift[c], &s, &ss);
    sum[c] += s;
    sum_sq[c] += ss;
  }
}

template <typename scalar_t, typename acc_t, bool kResidual>
RD_CPU_CLONES void planes_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t begin, int64_t end,
                                  int64_t plane, int64_t channels, const acc_t* scale, const acc_t* shift) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    span_forward<scalar_t, acc_t, kResidual>(x + p * plane, kResidual ? residual + p * plane : nullptr,
                                             y + p * plane, plane, scale[c], shift[c]);
  }
}

template <typename scalar_t, typename acc_t, Dz kDz>
RD_CPU_CLONES RD_REORDERED_SUMS void planes_backward_sums(const scalar_t* grad_out, const scalar_t* out,
                                                          const scalar_t* x, scalar_t* dz_out, int64_t begin,
                                                          int64_t end, int64_t plane, int64_t channels,
                                                          const acc_t* mean, const acc_t* scale, const acc_t* shift,
                                                          double* sum_dz, double* sum_dz_xmu) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    const int64_t o = p * plane;
    acc_t s0 = 0, s1 = 0;
    span_backward_sums<scalar_t, acc_t, kDz>(grad_out + o, at_offset(out, o), x + o, at_offset(dz_out, o), plane,
                                             mean[c], input_mask_value<kDz>(scale, c),
                                             input_mask_value<kDz>(shift, c), &s0, &s1);
    sum_dz[c] += s0;
    sum_dz_xmu[c] += s1;
  }
}

template <typename scalar_t, typename acc_t, Dz kDz>
RD_CPU_CLONES void planes_backward_apply(const scalar_t* grad_out_or_dz, const scalar_t* out, const scalar_t* x,
                                         scalar_t* grad_input, int64_t begin, int64_t end, int64_t plane,
                                         int64_t channels, const acc_t* scale, const acc_t* shift, const acc_t* ka,
                                         const acc_t* kb, const acc_t* kc) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    const int64_t o = p * plane;
    span_backward_apply<scalar_t, acc_t, kDz>(grad_out_or_dz + o, at_offset(out, o), x + o, grad_input + o, plane,
                                              input_mask_value<kDz>(scale, c), input_mask_value<kDz>(shift, c),
                                              ka[c], kb[c], kc[c]);
  }
}

// ---- Streamed float32 variants: each tile is computed into an L1-resident buffer by the same inner loops,
// then streamed out (cpu/streaming_stores.h). NCHW planes stream from their first 64-byte boundary, with the
// unaligned head and the tail (under 16 values) stored normally. channels_last streams whole rows, so it
// needs rows of whole 64-byte lines (channels a multiple of 16, see rows_stream).

constexpr int64_t kStreamTile = 2048;  // floats: 8 KB

// Values before p's next 64-byte boundary, at most n.
inline int64_t until_aligned(const float* p, int64_t n) {
  const int64_t into_line = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 64) / int64_t(sizeof(float));
  return std::min<int64_t>(n, into_line == 0 ? 0 : 16 - into_line);
}

// Whether channels_last rows of `channels` floats starting at y can be streamed whole.
inline bool rows_stream(const float* y, int64_t channels) {
  return channels % 16 == 0 && channels <= kStreamTile && reinterpret_cast<uintptr_t>(y) % 64 == 0;
}

// The streaming copy to write the float32 output y of a pass walking g with, or nullptr for normal stores;
// `tensors` is how many activation-sized tensors the operator touches.
inline StreamFloats output_streamer(const Geometry& g, const float* y, int64_t tensors) {
  const int64_t footprint = tensors * g.batch * g.channels * g.plane * int64_t(sizeof(float));
  if (!stream_float_output(footprint) || (g.channels_last && !rows_stream(y, g.channels))) return nullptr;
  return stream_floats_function();
}

template <typename acc_t, bool kResidual>
RD_CPU_CLONES void planes_forward_streamed(const float* x, const float* residual, float* y, int64_t begin,
                                           int64_t end, int64_t plane, int64_t channels, const acc_t* scale,
                                           const acc_t* shift, StreamFloats stream) {
  alignas(64) float tile[kStreamTile];
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    const float* xp = x + p * plane;
    const float* rp = kResidual ? residual + p * plane : nullptr;
    float* yp = y + p * plane;
    int64_t i = until_aligned(yp, plane);
    span_forward<float, acc_t, kResidual>(xp, rp, yp, i, scale[c], shift[c]);
    for (int64_t count; (count = std::min(kStreamTile, (plane - i) / 16 * 16)) > 0; i += count) {
      span_forward<float, acc_t, kResidual>(xp + i, kResidual ? rp + i : nullptr, tile, count, scale[c], shift[c]);
      stream(yp + i, tile, count);
    }
    span_forward<float, acc_t, kResidual>(xp + i, kResidual ? rp + i : nullptr, yp + i, plane - i, scale[c],
                                          shift[c]);
  }
  streaming_fence();
}

template <typename acc_t, bool kResidual, int64_t kChannels>
RD_CPU_CLONES void rows_forward_streamed(const float* x, const float* residual, float* y, int64_t rows,
                                         int64_t runtime_channels, const acc_t* scale, const acc_t* shift,
                                         StreamFloats stream) {
  const int64_t channels = kChannels > 0 ? kChannels : runtime_channels;
  alignas(64) float tile[kStreamTile];
  const int64_t tile_rows = kStreamTile / channels;
  for (int64_t row = 0; row < rows; row += tile_rows) {
    const int64_t count = std::min(tile_rows, rows - row);
    const int64_t o = row * channels;
    block_rows_forward<float, acc_t, kResidual>(x + o, kResidual ? residual + o : nullptr, tile, count, channels,
                                                channels, scale, shift);
    stream(y + o, tile, count * channels);
  }
  streaming_fence();
}

template <typename acc_t, Dz kDz>
RD_CPU_CLONES void planes_backward_apply_streamed(const float* grad_out_or_dz, const float* out, const float* x,
                                                  float* grad_input, int64_t begin, int64_t end, int64_t plane,
                                                  int64_t channels, const acc_t* scale, const acc_t* shift,
                                                  const acc_t* ka, const acc_t* kb, const acc_t* kc,
                                                  StreamFloats stream) {
  alignas(64) float tile[kStreamTile];
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % channels;
    const int64_t o = p * plane;
    const float* g = grad_out_or_dz + o;
    const float* yp = at_offset(out, o);
    const float* xp = x + o;
    float* gx = grad_input + o;
    const acc_t sc = input_mask_value<kDz>(scale, c), sh = input_mask_value<kDz>(shift, c);
    int64_t i = until_aligned(gx, plane);
    span_backward_apply<float, acc_t, kDz>(g, yp, xp, gx, i, sc, sh, ka[c], kb[c], kc[c]);
    for (int64_t count; (count = std::min(kStreamTile, (plane - i) / 16 * 16)) > 0; i += count) {
      span_backward_apply<float, acc_t, kDz>(g + i, at_offset(yp, i), xp + i, tile, count, sc, sh, ka[c], kb[c],
                                             kc[c]);
      stream(gx + i, tile, count);
    }
    span_backward_apply<float, acc_t, kDz>(g + i, at_offset(yp, i), xp + i, gx + i, plane - i, sc, sh, ka[c], kb[c],
                                           kc[c]);
  }
  streaming_fence();
}

template <typename acc_t, Dz kDz>
RD_CPU_CLONES void rows_backward_apply_streamed(const float* grad_out_or_dz, const float* out, const float* x,
                                                float* grad_input, int64_t rows, int64_t channels, const acc_t* scale,
                                                const acc_t* shift, const acc_t* ka, const acc_t* kb, const acc_t* kc,
                                                StreamFloats stream) {
  alignas(64) float tile[kStreamTile];
  const int64_t tile_rows = kStreamTile / channels;
  for (int64_t row = 0; row < rows; row += tile_rows) {
    const int64_t count = std::min(tile_rows, rows - row);
    const int64_t o = row * channels;
    block_rows_backward_apply<float, acc_t, kDz>(grad_out_or_dz + o, at_offset(out, o), x + o, tile, count,
                                                 channels, channels, scale, shift, ka, kb, kc);
    stream(grad_input + o, tile, count * channels);
  }
  streaming_fence();
}

// ---- Small float32 NCHW planes in vector lanes (cpu/channel_lanes.h): whole samples in memory order, each block
// of L channels (`plane` vectors) with its per-channel values spread across lanes by permutes. `lane_channel` holds
// the block's index vectors (lane_channels). Sums go into per-column arrays (channel_sums folds them), as the rows
// walk's do.

#if RD_HAVE_CHANNEL_LANES
template <int L>
using LaneFloats = typename Lanes<L>::Floats;

// The lanes' channels in the block's vector k.
template <int L>
RD_ALWAYS_INLINE typename Lanes<L>::Ints lanes_of(const int32_t* lane_channel, int64_t k) {
  return load_lanes<typename Lanes<L>::Ints>(lane_channel + k * L);
}

// dz of the vector at i (not with kStoredDz: see grad_behind_relu), with the lanes' scale and shift.
template <Dz kDz, typename V>
RD_ALWAYS_INLINE V lanes_grad_behind_relu(const float* grad_out, const float* out, int64_t i, V x, V scale, V shift) {
  if constexpr (kDz == Dz::kInputMask) {
    return relu_backward_from_input<V>(load_lanes<V>(grad_out + i), x, scale, shift);
  } else {
    return relu_backward<V>(load_lanes<V>(grad_out + i), load_lanes<V>(out + i));
  }
}

// sum[j] += sum(x - shift), sum_sq[j] += sum((x - shift)^2) for every column j of kRowsTogether samples at once
// (see rows_shifted_sums), then the rest one at a time.
struct LanesShiftedSums {
  template <int L>
  RD_ALWAYS_INLINE static void run(const float* __restrict__ x, int64_t samples, int64_t channels, int64_t plane,
                                   const int32_t* lane_channel, const float* shift, float* __restrict__ sum,
                                   float* __restrict__ sum_sq) {
    using V = LaneFloats<L>;
    const int64_t row = channels * plane;
    for (int64_t s = 0; s < samples;) {
      const int64_t together = samples - s >= kRowsTogether ? kRowsTogether : 1;
      const float* xs = x + s * row;
      for (int64_t c = 0; c < channels; c += L) {
        const V sh = load_lanes<V>(shift + c);
        for (int64_t k = 0; k < plane; ++k) {
          const V shk = spread(sh, lanes_of<L>(lane_channel, k));
          const int64_t i = c * plane + k * L;
          V s0 = load_lanes<V>(sum + i), s1 = load_lanes<V>(sum_sq + i);
          if (together == kRowsTogether) {
            const V d0 = load_lanes<V>(xs + i) - shk, d1 = load_lanes<V>(xs + row + i) - shk;
            const V d2 = load_lanes<V>(xs + 2 * row + i) - shk, d3 = load_lanes<V>(xs + 3 * row + i) - shk;
            s0 += (d0 + d1) + (d2 + d3);
            s1 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
          } else {
            const V d = load_lanes<V>(xs + i) - shk;
            s0 += d;
            s1 += d * d;
          }
          store_lanes(sum + i, s0);
          store_lanes(sum_sq + i, s1);
        }
      }
      s += together;
    }
  }
};

// The backward sums' terms of the vector at i: returns dz (also written to dz_out with kStoredDz) and sets
// *dz_xmu = dz * (x - mean).
template <Dz kDz, typename V>
RD_ALWAYS_INLINE V lanes_backward_terms(const float* grad_out, const float* out, const float* x, float* dz_out,
                                        int64_t i, V mean, V scale, V shift, V* dz_xmu) {
  const V xi = load_lanes<V>(x + i);
  const V dz = lanes_grad_behind_relu<kDz>(grad_out, out, i, xi, scale, shift);
  if constexpr (kDz == Dz::kStoredDz) store_lanes(dz_out + i, dz);
  *dz_xmu = dz * (xi - mean);
  return dz;
}

// sum_dz[j] += sum(dz), sum_dz_xmu[j] += sum(dz * (x - mean)) for every column j, kRowsTogether samples at once,
// then the rest one at a time; with kStoredDz, dz is also written to dz_out.
template <Dz kDz>
struct LanesBackwardSums {
  template <int L>
  RD_ALWAYS_INLINE static void run(const float* __restrict__ grad_out, const float* __restrict__ out,
                                   const float* __restrict__ x, float* __restrict__ dz_out, int64_t samples,
                                   int64_t channels, int64_t plane, const int32_t* lane_channel, const float* mean,
                                   const float* scale, const float* shift, float* __restrict__ sum_dz,
                                   float* __restrict__ sum_dz_xmu) {
    using V = LaneFloats<L>;
    const int64_t row = channels * plane;
    for (int64_t s = 0; s < samples;) {
      const int64_t together = samples - s >= kRowsTogether ? kRowsTogether : 1;
      for (int64_t c = 0; c < channels; c += L) {
        const V mu = load_lanes<V>(mean + c);
        V sc{}, sh{};  // the forward's affine map, for the input mask only
        if constexpr (kDz == Dz::kInputMask) {
          sc = load_lanes<V>(scale + c);
          sh = load_lanes<V>(shift + c);
        }
        for (int64_t k = 0; k < plane; ++k) {
          const auto lanes = lanes_of<L>(lane_channel, k);
          const V muk = spread(mu, lanes), sck = spread(sc, lanes), shk = spread(sh, lanes);
          const int64_t j = c * plane + k * L;  // column
          const int64_t i = s * row + j;
          V s0 = load_lanes<V>(sum_dz + j), s1 = load_lanes<V>(sum_dz_xmu + j);
          if (together == kRowsTogether) {
            V t0, t1, t2, t3;
            const V dz0 = lanes_backward_terms<kDz>(grad_out, out, x, dz_out, i, muk, sck, shk, &t0);
            const V dz1 = lanes_backward_terms<kDz>(grad_out, out, x, dz_out, i + row, muk, sck, shk, &t1);
            const V dz2 = lanes_backward_terms<kDz>(grad_out, out, x, dz_out, i + 2 * row, muk, sck, shk, &t2);
            const V dz3 = lanes_backward_terms<kDz>(grad_out, out, x, dz_out, i + 3 * row, muk, sck, shk, &t3);
            s0 += (dz0 + dz1) + (dz2 + dz3);
            s1 += (t0 + t1) + (t2 + t3);
          } else {
            V t;
            s0 += lanes_backward_terms<kDz>(grad_out, out, x, dz_out, i, muk, sck, shk, &t);
            s1 += t;
          }
          store_lanes(sum_dz + j, s0);
          store_lanes(sum_dz_xmu + j, s1);
        }
      }
      s += together;
    }
  }
};

template <bool kResidual>
struct LanesForward {
  template <int L>
  RD_ALWAYS_INLINE static void run(const float* __restrict__ x, const float* __restrict__ residual,
                                   float* __restrict__ y, int64_t samples, int64_t channels, int64_t plane,
                                   const int32_t* lane_channel, const float* scale, const float* shift) {
    using V = LaneFloats<L>;
    for (int64_t c = 0; c < samples * channels; c += L) {
      const V sc = load_lanes<V>(scale + c % channels), sh = load_lanes<V>(shift + c % channels);
      for (int64_t k = 0; k < plane; ++k) {
        const auto lanes = lanes_of<L>(lane_channel, k);
        const int64_t i = c * plane + k * L;
        const V r = kResidual ? load_lanes<V>(residual + i) : V{};
        store_lanes(y + i, bn_add_relu_forward<V>(load_lanes<V>(x + i), r, spread(sc, lanes), spread(sh, lanes)));
      }
    }
  }
};

// dx = a * dz + b * x + c (see input_grad_coeffs); with kStoredDz, grad_out_or_dz holds dz.
template <Dz kDz>
struct LanesBackwardApply {
  template <int L>
  RD_ALWAYS_INLINE static void run(const float* __restrict__ grad_out_or_dz, const float* __restrict__ out,
                                   const float* __restrict__ x, float* __restrict__ grad_input, int64_t samples,
                                   int64_t channels, int64_t plane, const int32_t* lane_channel, const float* scale,
                                   const float* shift, const float* ka, const float* kb, const float* kc) {
    using V = LaneFloats<L>;
    for (int64_t c = 0; c < samples * channels; c += L) {
      const int64_t channel = c % channels;
      V sc{}, sh{};  // the forward's affine map, for the input mask only
      if constexpr (kDz == Dz::kInputMask) {
        sc = load_lanes<V>(scale + channel);
        sh = load_lanes<V>(shift + channel);
      }
      const V a = load_lanes<V>(ka + channel), b = load_lanes<V>(kb + channel), cc = load_lanes<V>(kc + channel);
      for (int64_t k = 0; k < plane; ++k) {
        const auto lanes = lanes_of<L>(lane_channel, k);
        const int64_t i = c * plane + k * L;
        const V xi = load_lanes<V>(x + i);
        V dz;
        if constexpr (kDz == Dz::kStoredDz) {
          dz = load_lanes<V>(grad_out_or_dz + i);
        } else {
          dz = lanes_grad_behind_relu<kDz>(grad_out_or_dz, out, i, xi, spread(sc, lanes), spread(sh, lanes));
        }
        const InputGradCoeffs<V> k_lanes{spread(a, lanes), spread(b, lanes), spread(cc, lanes)};
        store_lanes(grad_input + i, bn_input_grad<V>(dz, xi, k_lanes));
      }
    }
  }
};

// Each kernel compiled for AVX-512 (16 lanes) and for AVX2 (8 lanes); run_in_lanes calls the one for `lanes` (from
// lane_width).
template <typename Kernel, typename... Args>
RD_LANES_16 void run_in_16_lanes(Args... args) {
  Kernel::template run<16>(args...);
}

template <typename Kernel, typename... Args>
RD_LANES_8 void run_in_8_lanes(Args... args) {
  Kernel::template run<8>(args...);
}

template <typename Kernel, typename... Args>
void run_in_lanes(int lanes, Args... args) {
  if (lanes == 16) {
    run_in_16_lanes<Kernel>(args...);
  } else {
    run_in_8_lanes<Kernel>(args...);
  }
}
#endif

// ---- Parallel drivers ----

// Work below this many elements per task is not worth a thread hand-off.
constexpr int64_t kElementsPerTask = 32768;
// channels_last partial sums stay in acc_t for this many rows, then move into double.
constexpr int64_t kRowsPerPartialSum = 256;

// out[c] += the sum of block[c * fold] to block[c * fold + fold - 1], for every channel, then block = 0. A fold (9
// columns of a 3x3 plane) is too short to vectorize, and summing one channel at a time is a chain of dependent adds
// (a third of a call at 1x512x3x3), so kFoldLanes channels are summed side by side, one column of each at a time.
constexpr int64_t kFoldLanes = 64;

template <typename acc_t>
RD_CPU_CLONES void fold_columns(acc_t* __restrict__ block, int64_t channels, int64_t fold, double* __restrict__ out) {
  for (int64_t first = 0; first < channels; first += kFoldLanes) {
    const int64_t lanes = std::min(kFoldLanes, channels - first);
    const acc_t* __restrict__ columns = block + first * fold;
    acc_t sum[kFoldLanes] = {};
    for (int64_t k = 0; k < fold; ++k) {
#pragma omp simd
      for (int64_t lane = 0; lane < lanes; ++lane) sum[lane] += columns[lane * fold + k];
    }
#pragma omp simd
    for (int64_t lane = 0; lane < lanes; ++lane) out[first + lane] += static_cast<double>(sum[lane]);
  }
  std::fill_n(block, channels * fold, acc_t(0));
}

// Two sums per channel, in double. add_planes(begin, end, s0[], s1[]) adds NCHW planes into per-channel double
// arrays; add_rows(offset, rows, s0[], s1[]) adds a block of channels_last rows into per-channel acc_t arrays.
// Both layouts are read in memory order, each thread into partial sums of its own, combined at the end.
// g is the geometry walked and `channels` the operator's channel count: when small NCHW planes are walked as
// rows (see walk_as_rows), each channel owns g.channels / channels consecutive columns, added together as a
// block's sums move into double, so that the per-thread sums and the results hold one value per channel.
template <typename acc_t, typename AddPlanes, typename AddRows>
void channel_sums(const Geometry& g, int64_t channels, const AddPlanes& add_planes, const AddRows& add_rows,
                  std::vector<double>& sum0, std::vector<double>& sum1) {
  const int64_t fold = g.channels / channels;  // columns per channel
  const int threads = at::get_num_threads();
  std::vector<double> partial(2 * threads * channels, 0.0);
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, g.plane));
    at::parallel_for(0, g.batch * channels, grain, [&](int64_t begin, int64_t end) {
      double* p0 = partial.data() + 2 * at::get_thread_num() * channels;
      double* p1 = p0 + channels;
      add_planes(begin, end, p0, p1);
    });
  } else {
    const int64_t columns = g.channels;
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / columns);
    at::parallel_for(0, g.batch * g.plane, grain, [&](int64_t begin, int64_t end) {
      double* p0 = partial.data() + 2 * at::get_thread_num() * channels;
      double* p1 = p0 + channels;
      std::vector<acc_t> block0(columns), block1(columns);  // zeroed here, then again as they are emptied
      for (int64_t row = begin; row < end; row += kRowsPerPartialSum) {
        add_rows(row * columns, std::min(kRowsPerPartialSum, end - row), block0.data(), block1.data());
        fold_columns(block0.data(), channels, fold, p0);
        fold_columns(block1.data(), channels, fold, p1);
      }
    });
  }
  sum0.assign(channels, 0.0);
  sum1.assign(channels, 0.0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < channels; ++c) {
      sum0[c] += partial[2 * t * channels + c];
      sum1[c] += partial[(2 * t + 1) * channels + c];
    }
  }
}

// An elementwise pass: apply_planes(begin, end) for a range of NCHW planes, apply_rows(offset, rows) for a block of
// channels_last rows, each thread taking one range.
//   kMemoryOrder:    the range in memory order, in one call (eval, which reads nothing before): walked from the
//                    end in blocks instead, channels_last eval took up to a third longer.
//   kAfterReduction: after a reduction pass over the same tensors, with the same total and grain, so that each
//                    thread gets the range it reduced, walked from its end in blocks: the reduction finished there,
//                    so that part of its tensors is still in the last-level cache, while in memory order the pass
//                    would start on what the reduction read first, the part most likely evicted.
enum class Walk { kMemoryOrder, kAfterReduction };

// make_values() runs once on each thread, before its range, and what it returns is passed to every apply call of
// that thread: per-channel values made there are read only by the thread that wrote them.
template <typename MakeValues, typename ApplyPlanes, typename ApplyRows>
void elementwise_with(const Geometry& g, Walk walk, const MakeValues& make_values, const ApplyPlanes& apply_planes,
                      const ApplyRows& apply_rows) {
  const int64_t channels = g.channels;
  const int64_t per_unit = g.channels_last ? channels : std::max<int64_t>(1, g.plane);  // planes or rows
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / per_unit);
  const int64_t units = g.channels_last ? g.batch * g.plane : g.batch * channels;
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    auto&& values = make_values();
    const auto apply = [&](int64_t start, int64_t stop) {
      if (g.channels_last) {
        apply_rows(values, start * channels, stop - start);
      } else {
        apply_planes(values, start, stop);
      }
    };
    if (walk == Walk::kMemoryOrder) return apply(begin, end);
    for (int64_t stop = end; stop > begin; stop -= grain) apply(std::max(begin, stop - grain), stop);
  });
}

template <typename ApplyPlanes, typename ApplyRows>
void elementwise(const Geometry& g, Walk walk, const ApplyPlanes& apply_planes, const ApplyRows& apply_rows) {
  struct None {};
  elementwise_with(
      g, walk, [] { return None{}; }, [&](None, int64_t begin, int64_t end) { apply_planes(begin, end); },
      [&](None, int64_t offset, int64_t rows) { apply_rows(offset, rows); });
}

// ---- Per-channel loops ----
// One value per channel, in loops compiled per ISA and vectorized across channels: scalar, a channel's divisions
// and square root held about a tenth of a training forward's perf samples at 1x512x3x3. (setup.py builds with
// -fno-math-errno, without which a square root is not vectorized.)

// var and invstd may be the same array.
template <typename acc_t>
RD_CPU_CLONES void channel_inverse_stds(const acc_t* var, int64_t channels, double eps, acc_t* invstd) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) invstd[c] = inverse_std<acc_t>(var[c], eps);
}

// Mean and inverse std from the shifted sums. invstd holds the variances until a second loop turns them into
// inverse stds in place: apart, that loop vectorizes (for float, GCC leaves the double-to-float loop before it
// scalar, and with it in it, both).
template <typename acc_t>
RD_CPU_CLONES void channel_stats(const double* __restrict__ sum, const double* __restrict__ sum_sq,
                                 const acc_t* __restrict__ shift, int64_t channels, double count, double eps,
                                 acc_t* __restrict__ mean, acc_t* __restrict__ invstd) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const MeanVar<acc_t> mv = mean_var_from_shifted_sums<acc_t>(sum[c], sum_sq[c], count, shift[c]);
    mean[c] = mv.mean;
    invstd[c] = mv.var;
  }
  channel_inverse_stds(invstd, channels, eps, invstd);
}

template <typename acc_t>
RD_CPU_CLONES void channel_affines(const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                   const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, int64_t channels,
                                   acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const ChannelAffine<acc_t> affine = bn_affine(mean[c], invstd[c], weight[c], bias[c]);
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
}

// Eval's affine map, from the running statistics.
template <typename acc_t>
RD_CPU_CLONES void channel_affines_of_running_stats(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                                    double eps, const acc_t* __restrict__ weight,
                                                    const acc_t* __restrict__ bias, int64_t channels,
                                                    acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const ChannelAffine<acc_t> affine = bn_affine(mean[c], inverse_std<acc_t>(var[c], eps), weight[c], bias[c]);
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
}

// The input gradient's coefficients (dx = a * dz + b * x + c) and the parameter gradients, from the backward sums.
template <typename acc_t>
RD_CPU_CLONES void channel_backward_coeffs(const double* __restrict__ sum_dz, const double* __restrict__ sum_dz_xmu,
                                           const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                           const acc_t* __restrict__ weight, int64_t channels, acc_t count,
                                           bool training, acc_t* __restrict__ ka, acc_t* __restrict__ kb,
                                           acc_t* __restrict__ kc, acc_t* __restrict__ grad_weight,
                                           acc_t* __restrict__ grad_bias) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t dz = static_cast<acc_t>(sum_dz[c]);
    const acc_t dz_xmu = static_cast<acc_t>(sum_dz_xmu[c]);
    const InputGradCoeffs<acc_t> k = input_grad_coeffs<acc_t>(mean[c], invstd[c], weight[c], dz, dz_xmu, count,
                                                              training);
    ka[c] = k.a;
    kb[c] = k.b;
    kc[c] = k.c;
    grad_weight[c] = weight_grad<acc_t>(dz_xmu, invstd[c]);
    grad_bias[c] = dz;
  }
}

// ---- Passes ----

// Per-channel values of one call, left uninitialized: in a C++ loop at 1x512x3x3 an eval call took 1.07-1.10 µs
// this way and 1.24-1.31 µs with zero-filled std::vectors (at::add: 0.70-0.82). Not on the caller's stack, which
// saved another 0.13 µs there: the other threads read these values, and a training forward at 64x128x12x12 NCHW
// took 15% longer with them on the stack.
template <typename T>
using CallValues = c10::SmallVector<T, 0>;

template <typename T>
CallValues<T> call_values(int64_t count) {
  CallValues<T> values;
  values.resize_for_overwrite(static_cast<size_t>(count));
  return values;
}

// NCHW planes smaller than this are walked as channels_last rows of C*H*W values (one sample each), so that inner
// loops are long enough to vectorize: in vector lanes where small_plane_lanes allows, else with every per-channel
// value repeated H*W times. A 6x6 plane (36 values) in a loop of its own runs two 16-lane steps and a scalar tail,
// and pays a reduction's set-up and final lane sum per plane: walked as rows, a training step at 64x256x6x6 took a
// quarter to a third less time.
constexpr int64_t kSmallPlane = 64;

bool walk_as_rows(const Geometry& g) {
  return !g.channels_last && g.plane < kSmallPlane;
}

Geometry rows_geometry(const Geometry& g) {
  return {g.batch, g.channels * g.plane, 1, true};
}

// The vector width with which a pass over g walks whole samples with per-channel values in lanes
// (cpu/channel_lanes.h): float32 only, small NCHW planes only, or 0 to walk them as rows with repeated values (see
// PerWalkedChannel). The elementwise passes use it only when their output is not streamed. In lanes, NCHW steps at
// 3x3 and 6x6 planes took 0.77x-0.97x of their time as rows.
template <typename scalar_t>
int small_plane_lanes(const Geometry& g) {
  return std::is_same_v<scalar_t, float> && walk_as_rows(g) && g.plane > 1 ? lane_width(g.channels) : 0;
}

// The index vectors of a walk in `lanes` lanes, or none.
CallValues<int32_t> lane_channels_of(int lanes, const Geometry& g) {
  CallValues<int32_t> index = call_values<int32_t>(lanes > 0 ? lanes * g.plane : 0);
  if (lanes > 0) lane_channels(lanes, g.plane, index.data());
  return index;
}

// Values stored kRepeatLanes at a time: out[c * times + k] = values[c] for k < times. What passes a channel's
// `times` values is overwritten by the next channel's, and the last channel's lands in kRepeatLanes values of
// slack after count * times. Cloned per ISA: with AVX-512 a 3x3 plane is one broadcast and one store.
constexpr int64_t kRepeatLanes = 16;

template <typename T>
RD_CPU_CLONES void repeat_each(const T* __restrict__ values, int64_t count, int64_t times, T* __restrict__ out) {
  for (int64_t c = 0; c < count; ++c, out += times) {
    const T value = values[c];
    for (int64_t k = 0; k < times; k += kRepeatLanes) {
      for (int64_t lane = 0; lane < kRepeatLanes; ++lane) out[k + lane] = value;
    }
  }
}

// Whether a walk of g reads per-channel values repeated H*W times: rows walked without lanes (1x1 planes read each
// value once, as given).
bool repeats_values(const Geometry& g) {
  return walk_as_rows(g) && g.plane > 1;
}

// values[c] repeated H*W times for every channel of g, in memory of its own (with repeat_each's slack).
template <typename T>
std::unique_ptr<T[]> repeated_values(const T* values, const Geometry& g) {
  std::unique_ptr<T[]> repeated(new T[g.channels * g.plane + kRepeatLanes]);
  repeat_each(values, g.channels, g.plane, repeated.get());
  return repeated;
}

// Per-channel values as the walk of g reads them: the values themselves, or, when g is walked as rows with
// repeated values (not in lanes), each repeated H*W times (at batch 1 writing them is as much work as the data, so
// it is done in vector stores).
// Each thread repeats them into memory of its own, on its first data() call: repeated once by the calling thread
// and read by both, the arrays' lines were pulled to the other core on every call and taken back by the next
// call's writes, which cost more than the whole walk at 8x512x3x3 (42 µs per eval with 2 threads, 22 with 1).
template <typename T>
class PerWalkedChannel {
 public:
  PerWalkedChannel(const T* values, const Geometry& g)
      // null (values a pass does not read) stays null
      : values_(values),
        geometry_(g),
        per_thread_(values != nullptr && repeats_values(g) ? at::get_num_threads() : 0) {}

  // From the thread that reads the values (inside at::parallel_for, or the caller's).
  const T* data() {
    if (per_thread_.empty()) return values_;
    std::unique_ptr<T[]>& mine = per_thread_.at(at::get_thread_num());
    if (!mine) mine = repeated_values(values_, geometry_);
    return mine.get();
  }

 private:
  const T* values_;
  Geometry geometry_;
  std::vector<std::unique_ptr<T[]>> per_thread_;
};

// Batch mean and inverse std of every channel, from sums shifted by the channel's first value.
template <typename scalar_t, typename acc_t>
void batch_stats(const Geometry& g, const scalar_t* x, acc_t* mean, acc_t* invstd, double eps) {
  CallValues<acc_t> shift = call_values<acc_t>(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) {
    shift[c] = static_cast<acc_t>(x[g.channels_last ? c : c * g.plane]);
  }
  const Geometry w = walk_as_rows(g) ? rows_geometry(g) : g;
  PerWalkedChannel<acc_t> walked_shift(shift.data(), g);
  const int lanes = small_plane_lanes<scalar_t>(g);
  const CallValues<int32_t> lane_channel = lane_channels_of(lanes, g);
  std::vector<double> sum, sum_sq;
  channel_sums<acc_t>(
      w, g.channels,
      [&](int64_t begin, int64_t end, double* s, double* ss) {
        planes_shifted_sums<scalar_t, acc_t>(x, begin, end, w.plane, w.channels, walked_shift.data(), s, ss);
      },
      [&](int64_t offset, int64_t rows, acc_t* s, acc_t* ss) {
#if RD_HAVE_CHANNEL_LANES
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (lanes) {
            return run_in_lanes<LanesShiftedSums>(lanes, x + offset, rows, g.channels, g.plane, lane_channel.data(),
                                                  shift.data(), s, ss);
          }
        }
#endif
        with_fixed_channels(w.channels, [&](auto fixed) {
          rows_shifted_sums<scalar_t, acc_t, decltype(fixed)::value>(x + offset, rows, w.channels,
                                                                     walked_shift.data(), s, ss);
        });
      },
      sum, sum_sq);
  channel_stats<acc_t>(sum.data(), sum_sq.data(), shift.data(), g.channels, double(g.per_channel()), eps, mean,
                       invstd);
}

// Per-channel arrays of up to this many values are kept on the stack of the thread that reads them (ForwardValues):
// the widest layer of ResNet-18 and ResNet-34.
constexpr unsigned kStackChannels = 512;

// The forward's per-channel scale and shift, and the lane table, as one thread's walk of g reads them, made by that
// thread in memory of its own (elementwise_with): on its stack up to kStackChannels channels, and where g is walked as
// rows without lanes, repeated H*W times on the heap (as PerWalkedChannel does). Made once per call by the calling
// thread on the heap and read by all, they cost malloc and free, and the other cores' fetches of the lines just
// written: in a C++ loop at 1x512x3x3 an eval without residual took 0.97-1.16 µs that way, 0.80-0.83 this way
// (at::relu: 0.64-0.66).
template <typename acc_t>
class ForwardValues {
 public:
  // affine(scale, shift) writes every channel's map; `lanes` is the walk's small_plane_lanes, or 0 to walk rows.
  template <typename Affine>
  ForwardValues(const Geometry& g, int lanes, const Affine& affine) {
    scale_.resize_for_overwrite(g.channels);
    shift_.resize_for_overwrite(g.channels);
    affine(scale_.data(), shift_.data());
    if (lanes > 0) {
      lane_channel_.resize_for_overwrite(lanes * g.plane);
      lane_channels(lanes, g.plane, lane_channel_.data());
    } else if (repeats_values(g)) {
      repeated_scale_ = repeated_values(scale_.data(), g);
      repeated_shift_ = repeated_values(shift_.data(), g);
    }
  }

  // As the walk reads them.
  const acc_t* scale() const { return repeated_scale_ ? repeated_scale_.get() : scale_.data(); }
  const acc_t* shift() const { return repeated_shift_ ? repeated_shift_.get() : shift_.data(); }
  // Per channel, as the lane kernels read them.
  const acc_t* channel_scale() const { return scale_.data(); }
  const acc_t* channel_shift() const { return shift_.data(); }
  const int32_t* lane_channel() const { return lane_channel_.data(); }

 private:
  c10::SmallVector<acc_t, kStackChannels> scale_, shift_;
  c10::SmallVector<int32_t, 16 * kSmallPlane> lane_channel_;
  std::unique_ptr<acc_t[]> repeated_scale_, repeated_shift_;
};

// y = relu(x * scale[c] + shift[c] + residual), with affine(scale, shift) writing every channel's scale and shift.
template <typename scalar_t, typename acc_t, bool kResidual, typename Affine>
void normalize_add_relu_pass(const Geometry& g, Walk walk, const scalar_t* x, const scalar_t* r, scalar_t* y,
                             const Affine& affine) {
  const Geometry w = walk_as_rows(g) ? rows_geometry(g) : g;
  using Values = ForwardValues<acc_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (const StreamFloats stream = output_streamer(w, y, kResidual ? 3 : 2)) {  // x, residual, y
      return elementwise_with(
          w, walk, [&] { return Values(g, 0, affine); },
          [&](const Values& v, int64_t begin, int64_t end) {
            planes_forward_streamed<acc_t, kResidual>(x, r, y, begin, end, w.plane, w.channels, v.scale(), v.shift(),
                                                      stream);
          },
          [&](const Values& v, int64_t offset, int64_t rows) {
            with_fixed_channels(w.channels, [&](auto fixed) {
              rows_forward_streamed<acc_t, kResidual, decltype(fixed)::value>(
                  x + offset, kResidual ? r + offset : nullptr, y + offset, rows, w.channels, v.scale(), v.shift(),
                  stream);
            });
          });
    }
  }
#if RD_HAVE_CHANNEL_LANES
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (const int lanes = small_plane_lanes<scalar_t>(g)) {
      return elementwise_with(
          w, walk, [&] { return Values(g, lanes, affine); },
          [](const Values&, int64_t, int64_t) {},  // w is walked as rows
          [&](const Values& v, int64_t offset, int64_t samples) {
            run_in_lanes<LanesForward<kResidual>>(lanes, x + offset, kResidual ? r + offset : nullptr, y + offset,
                                                  samples, g.channels, g.plane, v.lane_channel(), v.channel_scale(),
                                                  v.channel_shift());
          });
    }
  }
#endif
  elementwise_with(
      w, walk, [&] { return Values(g, 0, affine); },
      [&](const Values& v, int64_t begin, int64_t end) {
        planes_forward<scalar_t, acc_t, kResidual>(x, r, y, begin, end, w.plane, w.channels, v.scale(), v.shift());
      },
      [&](const Values& v, int64_t offset, int64_t rows) {
        with_fixed_channels(w.channels, [&](auto fixed) {
          rows_forward<scalar_t, acc_t, kResidual, decltype(fixed)::value>(
              x + offset, kResidual ? r + offset : nullptr, y + offset, rows, w.channels, v.scale(), v.shift());
        });
      });
}

// y = relu(x * scale[c] + shift[c] + residual), with affine(scale, shift) writing every channel's scale and shift
// (on each thread that reads them).
template <typename scalar_t, typename acc_t, typename Affine>
void normalize_add_relu(const ForwardArgs& a, Walk walk, const Affine& affine, at::Tensor& out) {
  const scalar_t* x = a.input.data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  if (a.residual.defined()) {
    normalize_add_relu_pass<scalar_t, acc_t, true>(a.geom, walk, x, a.residual.data_ptr<scalar_t>(), y, affine);
  } else {
    normalize_add_relu_pass<scalar_t, acc_t, false>(a.geom, walk, x, nullptr, y, affine);
  }
}

// Activation-sized tensors the backward touches: grad_out, x and grad_x, with out unless the mask comes from the
// input, and dz when it is stored.
constexpr int64_t backward_tensors(Dz dz) {
  return dz == Dz::kStoredDz ? 5 : dz == Dz::kOutputMask ? 4 : 3;
}

// Both backward passes, finding dz as kDz says (see Dz): y is null with kInputMask, which needs the forward's
// bias; dz (the residual's gradient) is written with kStoredDz only.
template <typename scalar_t, typename acc_t, Dz kDz>
void backward_passes(const Geometry& g, const scalar_t* gy, const scalar_t* y, const scalar_t* x, scalar_t* gx,
                     scalar_t* dz, const acc_t* mean, const acc_t* invstd, const acc_t* weight, const acc_t* bias,
                     bool training, acc_t* grad_weight, acc_t* grad_bias) {
  const int64_t channels = g.channels;
  const Geometry w = walk_as_rows(g) ? rows_geometry(g) : g;
  PerWalkedChannel<acc_t> walked_mean(mean, g);
  CallValues<acc_t> scale, shift;  // the forward's affine map, for the input mask only
  if constexpr (kDz == Dz::kInputMask) {
    scale.resize_for_overwrite(channels);
    shift.resize_for_overwrite(channels);
    channel_affines<acc_t>(mean, invstd, weight, bias, channels, scale.data(), shift.data());
  }
  PerWalkedChannel<acc_t> walked_scale(scale.empty() ? nullptr : scale.data(), g);
  PerWalkedChannel<acc_t> walked_shift(shift.empty() ? nullptr : shift.data(), g);
  const int lanes = small_plane_lanes<scalar_t>(g);
  const CallValues<int32_t> lane_channel = lane_channels_of(lanes, g);
  std::vector<double> sum_dz, sum_dz_xmu;
  channel_sums<acc_t>(
      w, channels,
      [&](int64_t begin, int64_t end, double* s0, double* s1) {
        planes_backward_sums<scalar_t, acc_t, kDz>(gy, y, x, dz, begin, end, w.plane, w.channels, walked_mean.data(),
                                                   walked_scale.data(), walked_shift.data(), s0, s1);
      },
      [&](int64_t offset, int64_t rows, acc_t* s0, acc_t* s1) {
#if RD_HAVE_CHANNEL_LANES
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (lanes) {
            return run_in_lanes<LanesBackwardSums<kDz>>(lanes, gy + offset, at_offset(y, offset), x + offset,
                                                        at_offset(dz, offset), rows, channels, g.plane,
                                                        lane_channel.data(), mean, scale.data(), shift.data(), s0,
                                                        s1);
          }
        }
#endif
        with_fixed_channels(w.channels, [&](auto fixed) {
          rows_backward_sums<scalar_t, acc_t, kDz, decltype(fixed)::value>(
              gy + offset, at_offset(y, offset), x + offset, at_offset(dz, offset), rows, w.channels,
              walked_mean.data(), walked_scale.data(), walked_shift.data(), s0, s1);
        });
      },
      sum_dz, sum_dz_xmu);

  CallValues<acc_t> ka = call_values<acc_t>(channels), kb = call_values<acc_t>(channels);
  CallValues<acc_t> kc = call_values<acc_t>(channels);
  const acc_t count = static_cast<acc_t>(g.per_channel());
  channel_backward_coeffs<acc_t>(sum_dz.data(), sum_dz_xmu.data(), mean, invstd, weight, channels, count, training,
                                 ka.data(), kb.data(), kc.data(), grad_weight, grad_bias);

  PerWalkedChannel<acc_t> walked_a(ka.data(), g);
  PerWalkedChannel<acc_t> walked_b(kb.data(), g);
  PerWalkedChannel<acc_t> walked_c(kc.data(), g);
  const scalar_t* source = kDz == Dz::kStoredDz ? dz : gy;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (const StreamFloats stream = output_streamer(w, gx, backward_tensors(kDz))) {
      return elementwise(
          w, Walk::kAfterReduction,
          [&](int64_t begin, int64_t end) {
            planes_backward_apply_streamed<acc_t, kDz>(source, y, x, gx, begin, end, w.plane, w.channels,
                                                       walked_scale.data(), walked_shift.data(), walked_a.data(),
                                                       walked_b.data(), walked_c.data(), stream);
          },
          [&](int64_t offset, int64_t rows) {
            rows_backward_apply_streamed<acc_t, kDz>(source + offset, at_offset(y, offset), x + offset, gx + offset,
                                                     rows, w.channels, walked_scale.data(), walked_shift.data(),
                                                     walked_a.data(), walked_b.data(), walked_c.data(), stream);
          });
    }
  }
#if RD_HAVE_CHANNEL_LANES
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (lanes) {
      return elementwise(
          w, Walk::kAfterReduction, [](int64_t, int64_t) {},  // w is walked as rows
          [&](int64_t offset, int64_t samples) {
            run_in_lanes<LanesBackwardApply<kDz>>(lanes, source + offset, at_offset(y, offset), x + offset,
                                                  gx + offset, samples, channels, g.plane, lane_channel.data(),
                                                  scale.data(), shift.data(), ka.data(), kb.data(), kc.data());
          });
    }
  }
#endif
  elementwise(
      w, Walk::kAfterReduction,
      [&](int64_t begin, int64_t end) {
        planes_backward_apply<scalar_t, acc_t, kDz>(source, y, x, gx, begin, end, w.plane, w.channels,
                                                    walked_scale.data(), walked_shift.data(), walked_a.data(),
                                                    walked_b.data(), walked_c.data());
      },
      [&](int64_t offset, int64_t rows) {
        rows_backward_apply<scalar_t, acc_t, kDz>(source + offset, at_offset(y, offset), x + offset, gx + offset, rows,
                                                  w.channels, walked_scale.data(), walked_shift.data(),
                                                  walked_a.data(), walked_b.data(), walked_c.data());
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_cpu(const at::Tensor& input,
                                                                     const std::optional<at::Tensor>& residual,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_train", input, residual, weight, bias);
  check_training_count("bn_add_relu_train", input);
  const auto stats_options = input.options().dtype(stats_dtype(input));
  at::Tensor mean = at::empty({a.geom.channels}, stats_options);
  at::Tensor invstd = at::empty({a.geom.channels}, stats_options);
  at::Tensor out = at::empty_like(a.input, a.format);
  if (a.input.numel() == 0) {  // no values: an empty output, and statistics of nothing (NaN)
    mean.fill_(NAN);
    invstd.fill_(NAN);
    return {out, mean, invstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats<scalar_t, acc_t>(a.geom, a.input.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                                 invstd.data_ptr<acc_t>(), eps);
    const acc_t* mean_ptr = mean.data_ptr<acc_t>();
    const acc_t* invstd_ptr = invstd.data_ptr<acc_t>();
    const acc_t* weight_ptr = a.weight.data_ptr<acc_t>();
    const acc_t* bias_ptr = a.bias.data_ptr<acc_t>();
    normalize_add_relu<scalar_t, acc_t>(a, Walk::kAfterReduction, [&](acc_t* scale, acc_t* shift) {
      channel_affines<acc_t>(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, a.geom.channels, scale, shift);
    }, out);
  });
  return {out, mean, invstd};
}

at::Tensor bn_add_relu_eval_cpu(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_eval", input, residual, weight, bias);
  check_channel_param("bn_add_relu_eval", input, running_mean, "running_mean");
  check_channel_param("bn_add_relu_eval", input, running_var, "running_var");
  const at::Tensor mean = channel_vector(running_mean, input, 0.0);
  const at::Tensor var = channel_vector(running_var, input, 1.0);
  at::Tensor out = at::empty_like(a.input, a.format);
  if (a.input.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mean_ptr = mean.data_ptr<acc_t>();
    const acc_t* var_ptr = var.data_ptr<acc_t>();
    const acc_t* weight_ptr = a.weight.data_ptr<acc_t>();
    const acc_t* bias_ptr = a.bias.data_ptr<acc_t>();
    normalize_add_relu<scalar_t, acc_t>(a, Walk::kMemoryOrder, [&](acc_t* scale, acc_t* shift) {
      channel_affines_of_running_stats<acc_t>(mean_ptr, var_ptr, eps, weight_ptr, bias_ptr, a.geom.channels, scale,
                                              shift);
    }, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    bool training, bool residual_grad) {
  const BackwardArgs a =
      prepare_backward("bn_add_relu_backward", grad_out, out, input, mean, invstd, weight, bias, residual_grad);
  const int64_t channels = a.geom.channels;
  at::Tensor grad_input = at::empty_like(a.input, a.format);
  at::Tensor grad_residual = residual_grad ? at::empty_like(a.input, a.format) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({channels}, a.mean.options());
  at::Tensor grad_bias = at::empty({channels}, a.mean.options());
  const auto param_dtype = param_grad_dtype(input, weight);
  if (a.input.numel() == 0) {  // sums over no values
    return {grad_input, grad_residual, grad_weight.zero_().to(param_dtype), grad_bias.zero_().to(param_dtype)};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gy = a.grad_out.data_ptr<scalar_t>();
    const scalar_t* x = a.input.data_ptr<scalar_t>();
    scalar_t* gx = grad_input.data_ptr<scalar_t>();
    const acc_t* mean_ptr = a.mean.data_ptr<acc_t>();
    const acc_t* invstd_ptr = a.invstd.data_ptr<acc_t>();
    const acc_t* weight_ptr = a.weight.data_ptr<acc_t>();
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    acc_t* gb = grad_bias.data_ptr<acc_t>();
    if (!a.out.defined()) {
      backward_passes<scalar_t, acc_t, Dz::kInputMask>(a.geom, gy, nullptr, x, gx, nullptr, mean_ptr, invstd_ptr,
                                                       weight_ptr, a.bias.data_ptr<acc_t>(), training, gw, gb);
    } else if (residual_grad) {
      backward_passes<scalar_t, acc_t, Dz::kStoredDz>(a.geom, gy, a.out.data_ptr<scalar_t>(), x, gx,
                                                      grad_residual.data_ptr<scalar_t>(), mean_ptr, invstd_ptr,
                                                      weight_ptr, nullptr, training, gw, gb);
    } else {
      backward_passes<scalar_t, acc_t, Dz::kOutputMask>(a.geom, gy, a.out.data_ptr<scalar_t>(), x, gx, nullptr,
                                                        mean_ptr, invstd_ptr, weight_ptr, nullptr, training, gw, gb);
    }
  });
  return {grad_input, grad_residual, grad_weight.to(param_dtype), grad_bias.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, CPU, m) {
  m.impl("bn_add_relu_train", &bn_add_relu_train_cpu);
  m.impl("bn_add_relu_eval", &bn_add_relu_eval_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
}

}  // namespace resnet_deploy
