"""Keep freed activation-sized memory in the process instead of handing it back to the OS.

PyTorch's CPU tensors come from malloc. glibc's defaults give blocks of a few MB back to the OS when they are
freed (through munmap, or by trimming the top of the heap), so the next tensor of that size is backed by fresh
pages again, and the kernel zero-fills them one 4 KB page fault at a time. For ResNet activations (9.4 MB at
batch 64 and 96x96), a training step then spends more time in page faults than in arithmetic: the op
benchmark counts the faults per step (`faults/step`) with and without this setting.

`retain_freed_memory()` sets two glibc malloc options with mallopt(3): blocks up to 32 MB (glibc's maximum)
come from the heap, and the heap is trimmed only when more than 1 GB at its top is free. The setting is
process-wide and lasts for the life of the process: resident memory stays near its peak instead of shrinking
between steps. The command line applies it to training and benchmarks (`--system-malloc` turns it off);
a program that imports the package is left alone unless it calls this function.

A user who chose an allocator already (MALLOC_* / GLIBC_TUNABLES malloc settings, or a jemalloc, tcmalloc or
mimalloc preload) keeps it: the function then changes nothing and says why.
"""
import ctypes
import os
import platform

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

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
    # mmap threshold first: setting either value switches off glibc's dynamic adjustment of both.
    applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    if not applied:
        raise OSError("mallopt refused the malloc settings")
    _status = "retain"
    return _status


def status() -> str:
    """'retain' after retain_freed_memory() applied the setting, else 'system' or 'user (<reason>)'."""
    if _status == "system" and _user_choice():
        return f"user ({_user_choice()})"
    return _status
