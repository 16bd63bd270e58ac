// Per-channel values spread across vector lanes, for NCHW tensors with small planes (3x3, 6x6, ...).
//
// Walked in memory order, L channels of such a tensor are L * H * W contiguous values: H * W vectors of L lanes,
// lane l of vector k holding channel (L * k + l) / (H * W) of the block. One vector of the L channels' values
// (scale, shift, ...), permuted by a fixed index vector per k, gives each lane its channel's value in a register.
// The alternative, each per-channel value repeated H * W times in memory, reads one more array per value from
// wherever it fits (18 KB per array at 512x3x3).
//
// GCC vector extensions keep the per-element math in bn_add_relu.h: its functions take the vector types as acc_t.
// Kernels are compiled for AVX-512 (16 lanes) and for AVX2 (8 lanes) with target attributes, and used only when
// the CPU has the instruction set and L divides the channel count (lane_width), and only for float32 outputs written
// with normal stores: a pass whose output is streamed (cpu/streaming_stores.h) walks rows.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RD_HAVE_CHANNEL_LANES 1
// The instruction-set levels of the inner loops' x86-64-v4 and x86-64-v3 clones (RD_CPU_CLONES), so that a CPU
// runs the lane kernels with the same instructions, fused multiply-adds included, as the rows walk's clones: a
// backward's ReLU mask recomputed from the input then agrees with the forward's output, whichever walk each took.
#define RD_LANES_16 __attribute__((target("arch=x86-64-v4")))
#define RD_LANES_8 __attribute__((target("arch=x86-64-v3")))
#else
#define RD_HAVE_CHANNEL_LANES 0
#endif

namespace resnet_deploy {

#if RD_HAVE_CHANNEL_LANES
// The vector types' arguments and returns inside always-inlined functions trigger GCC's note that a vector wider
// than the baseline ISA changes the calling convention (-Wpsabi): nothing here is called across that boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

template <int L>
struct Lanes {
  typedef float Floats __attribute__((vector_size(4 * L)));
  typedef int32_t Ints __attribute__((vector_size(4 * L)));
};

// Unaligned loads and stores of a whole vector.
template <typename V, typename T>
inline __attribute__((always_inline)) V load_lanes(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline __attribute__((always_inline)) void store_lanes(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Lane l of the result holds values[lane_channel[l]].
template <typename V, typename I>
inline __attribute__((always_inline)) V spread(V values, I lane_channel) {
  return __builtin_shuffle(values, lane_channel);
}

#pragma GCC diagnostic pop

// The x86-64 level (4, 3, or 1 for the baseline) the CPU kernels run at on this CPU: that of the clone of the
// inner loops the loader picks (RD_CPU_CLONES in bn_add_relu.cpp, built under the same conditions), and so the
// lane kernels' width.
inline int x86_64_level() {
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
  return level;
}

// 16 on an x86-64-v4 CPU (AVX-512), 8 on an x86-64-v3 one (AVX2, FMA), whichever the CPU has and divides
// `channels`; 0 when neither.
inline int lane_width(int64_t channels) {
  if (x86_64_level() >= 4 && channels % 16 == 0) return 16;
  if (x86_64_level() >= 3 && channels % 8 == 0) return 8;
  return 0;
}

inline const char* cpu_kernel_level() {
  switch (x86_64_level()) {
    case 4: return "x86-64-v4 (AVX-512)";
    case 3: return "x86-64-v3 (AVX2)";
    default: return "x86-64 (baseline)";
  }
}
#else
inline int lane_width(int64_t) { return 0; }

inline const char* cpu_kernel_level() { return "portable (one build of the inner loops)"; }
#endif

// Writes the index vectors of a block of `lanes` channels with `plane` values each into index[lanes * plane]:
// entry k * lanes + l is (k * lanes + l) / plane, the channel of lane l in the block's vector k.
inline void lane_channels(int lanes, int64_t plane, int32_t* index) {
  for (int32_t channel = 0; channel < lanes; ++channel) {
    for (int64_t k = 0; k < plane; ++k) *index++ = channel;
  }
}

}  // namespace resnet_deploy
