// Streaming-store copies for x86-64 (AVX-512 or AVX when the CPU has it, else SSE, which every x86-64 CPU
// has), chosen once at run time, and the size threshold above which the kernels use them.
#include "cpu/streaming_stores.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RD_HAVE_STREAMING_STORES 1
#else
#define RD_HAVE_STREAMING_STORES 0
#endif

namespace resnet_deploy {
namespace {

// The most of the last-level cache the kernels count on. A virtual machine may report its host's whole L3 (a
// 2-vCPU Xeon showing 105 MB, most of which other tenants' cores use) or its own (a 2-vCPU Zen 5 EPYC showing
// 32 MB). Streaming an eval's output at a 28 MB footprint was 1.11x-1.14x faster on that Xeon and 1.04x-1.52x
// slower on that EPYC; at 42-56 MB (training steps) it was between 1.06x slower and 1.10x faster on both, and at
// 113 MB 1.10x faster. Also used when the system does not tell the size.
constexpr int64_t kMaxCacheBytes = 32 * 1024 * 1024;

// The size of the last-level cache shared by this CPU's cores, as Linux reports it ("32768K"), at most
// kMaxCacheBytes.
int64_t last_level_cache_bytes() {
  std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index3/size");
  long long value = 0;
  char unit = '\0';
  if (!(file >> value) || value <= 0) return kMaxCacheBytes;
  file >> unit;
  const int64_t scale = unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? 1024 * 1024 * 1024 : 1;
  return std::min(static_cast<int64_t>(value) * scale, kMaxCacheBytes);
}

#if RD_HAVE_STREAMING_STORES
__attribute__((target("avx512f"))) void stream_floats_avx512(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
}

__attribute__((target("avx"))) void stream_floats_avx(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_load_ps(src + i));
}

void stream_floats_sse(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(dst + i, _mm_load_ps(src + i));
}
#endif

int64_t threshold_from_environment() {
  const char* text = std::getenv("RESNET_DEPLOY_STREAMING_MIN_BYTES");
  if (text == nullptr || *text == '\0') return last_level_cache_bytes();
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return *end == '\0' ? static_cast<int64_t>(value) : last_level_cache_bytes();
}

std::atomic<int64_t>& threshold() {
  static std::atomic<int64_t> bytes{threshold_from_environment()};
  return bytes;
}

}  // namespace

StreamFloats stream_floats_function() {
#if RD_HAVE_STREAMING_STORES
  static const StreamFloats chosen = __builtin_cpu_supports("avx512f") ? stream_floats_avx512
                                     : __builtin_cpu_supports("avx")   ? stream_floats_avx
                                                                       : stream_floats_sse;
  return chosen;
#else
  return nullptr;
#endif
}

void streaming_fence() {
#if RD_HAVE_STREAMING_STORES
  _mm_sfence();
#endif
}

int64_t streaming_min_bytes() { return threshold().load(); }

int64_t set_streaming_min_bytes(int64_t bytes) { return threshold().exchange(bytes); }

bool stream_float_output(int64_t footprint_bytes) {
  const int64_t min_bytes = streaming_min_bytes();
  return stream_floats_function() != nullptr && min_bytes >= 0 && footprint_bytes >= min_bytes;
}

}  // namespace resnet_deploy
