"""Keep freed memory in the process instead of handing it back to the OS.

PyTorch's CPU tensors come from malloc. glibc's defaults serve blocks above a threshold (at most 32 MB) with
fresh mmap()s that free() unmaps, and trim the top of the heap when much of it is free, so the next tensor of
that size is backed by new pages, which the kernel zero-fills one 4 KB page fault at a time. For ResNet-18 at
96x96 and batch 64, the stem's 37.7 MB activations are always mapped afresh: a copy of one takes 16 ms instead
of 1.6 ms, and its convolution 35 ms instead of 7.5 ms. The 9.4 MB activations of the first stage fault too,
depending on the order of frees. The op benchmark counts the faults per call (`faults/call`).

`retain_freed_memory()` sets two glibc malloc options with mallopt(3): M_MMAP_MAX = 0 (every block comes from
the heap) and M_TRIM_THRESHOLD = -1 (the heap is never trimmed). Freed blocks are then reused by the next
allocations without page faults. The setting is process-wide and lasts for the life of the process: resident
memory stays at its peak instead of shrinking between steps. The command line applies it to every subcommand
(`resnet-deploy --system-malloc ...` turns it off); a program that imports the package is left alone unless it
calls this function.

A user who chose an allocator already (MALLOC_* / GLIBC_TUNABLES malloc settings, or a jemalloc, tcmalloc or
mimalloc preload) keeps it: the function then changes nothing and says why.
"""
import ctypes
import os
import platform

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # documented in mallopt(3): disables trimming completely
NO_MMAP = 0  # at most 0 blocks served by mmap

_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_status = "system"


def _user_choice() -> str:
    """Why the user's own allocator settings win, or '' when there are none."""
    for name in _ALLOCATOR_ENV:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc options"
    preload = os.environ.get("LD_PRELOAD", "")
    for allocator in _PRELOADED_ALLOCATORS:
        if allocator in preload:
            return f"{allocator} is preloaded"
    return ""


def retain_freed_memory() -> str:
    """Applies the setting (once) and returns what the process's allocator is now, for logs and reports:
    'retain' when applied, 'system' when the platform has no glibc, 'user (<reason>)' when the user chose."""
    global _status
    if _status != "system":
        return _status
    reason = _user_choice()
    if reason:
        _status = f"user ({reason})"
        return _status
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _status
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(M_MMAP_MAX, NO_MMAP) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not applied:
        raise OSError("mallopt refused the malloc settings")
    _status = "retain"
    return _status


def status() -> str:
    """'retain' after retain_freed_memory() applied the setting, else 'system' or 'user (<reason>)'."""
    reason = _user_choice() if _status == "system" else ""
    return f"user ({reason})" if reason else _status
