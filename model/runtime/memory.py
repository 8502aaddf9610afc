"""Keep freed memory in the process for the next batch instead of handing it back to the OS (CPU serving).

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap`` calls and unmaps them on
free, so every batch re-faults and the kernel re-zeroes its activations: a sizeable share of a forward's wall time
spent in the kernel (measured in docs/benchmarks.md). With mmap disabled and a high trim threshold, freed blocks
stay in the heap and are reused: no faults after the first batch. The cost: the process keeps its peak working
set (the largest batch's activations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4


@functools.cache
def retain_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory; False where the C library is not glibc (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Order matters: no new mmap-backed blocks, then never trim the heap top below 2 GiB of free memory.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
