// Non-temporal ("streaming") stores for float32 outputs too large to stay in cache.
//
// A normal store first reads the destination's cache line from memory, although the kernel overwrites all of
// it, and the written lines then push the op's inputs out of the cache. A streaming store writes whole lines
// straight to memory: for an elementwise pass over activations larger than the cache, one memory pass less.
// Below the threshold, outputs are stored normally, because the next layer finds them in cache.
#pragma once

#include <cstdint>

namespace resnet_deploy {

// Copies n floats (a multiple of 16) from src to dst (64-byte aligned) with streaming stores. Each thread
// ends its streamed writes with streaming_fence() before others may read them.
using StreamFloats = void (*)(float* dst, const float* src, int64_t n);

// The best streaming copy this CPU has, or nullptr where there is none (not x86-64).
StreamFloats stream_floats_function();
void streaming_fence();

// A pass streams its output when the activations the operator touches take at least this many bytes
// together (its footprint): then they cannot all stay in the last-level cache, and the output would push
// the inputs out before the next pass or layer reads them. Below it, the output is stored normally, and the
// next layer finds it in cache. Default: the last-level cache's size, at most 32 MB;
// RESNET_DEPLOY_STREAMING_MIN_BYTES sets the starting value (0 streams everything, a negative value nothing).
int64_t streaming_min_bytes();
// Sets the threshold for the rest of the process and returns the previous one.
int64_t set_streaming_min_bytes(int64_t bytes);

// Whether an operator whose activations take footprint_bytes writes its float32 output with streaming stores.
bool stream_float_output(int64_t footprint_bytes);

}  // namespace resnet_deploy
