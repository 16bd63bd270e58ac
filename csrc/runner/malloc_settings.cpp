#include "malloc_settings.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

extern char** environ;

namespace resnet_deploy {
namespace {

std::string user_choice() {
  for (char** entry = environ; *entry != nullptr; ++entry) {
    if (std::strncmp(*entry, "MALLOC_", 7) == 0) return std::string(*entry, std::strcspn(*entry, "=")) + " is set";
  }
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) {
    return "GLIBC_TUNABLES sets malloc options";
  }
  const char* preload = std::getenv("LD_PRELOAD");
  for (const char* allocator : {"jemalloc", "tcmalloc", "mimalloc"}) {
    if (preload != nullptr && std::strstr(preload, allocator) != nullptr) return std::string(allocator) + " is preloaded";
  }
  return "";
}

}  // namespace

std::string retain_freed_memory() {
  const std::string reason = user_choice();
  if (!reason.empty()) return "user (" + reason + ")";
#if defined(__GLIBC__)
  if (mallopt(M_MMAP_MAX, 0) != 1 || mallopt(M_TRIM_THRESHOLD, -1) != 1) {
    throw std::runtime_error("mallopt refused the malloc settings");
  }
  return "retain";
#else
  return "system";
#endif
}

}  // namespace resnet_deploy
