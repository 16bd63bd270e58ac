// The runner's counterpart of resnet_deploy.allocator: keep freed memory in the process for reuse.
#pragma once

#include <string>

namespace resnet_deploy {

// Sets glibc's M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = -1 (mallopt(3)) so that freed activations are reused
// instead of being handed back to the OS and page-faulted in again. Leaves a user's own choice alone
// (MALLOC_* or GLIBC_TUNABLES malloc settings, a preloaded jemalloc/tcmalloc/mimalloc). Returns what the
// process now uses: "retain", "system" (no glibc) or "user (<reason>)".
std::string retain_freed_memory();

}  // namespace resnet_deploy
