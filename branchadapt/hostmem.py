"""Host-memory allocator settings for training on a CPU: keep freed blocks for reuse.

A training step frees and allocates the same large buffers again every step (activations, their
gradients, weight gradients). glibc's ``malloc`` serves blocks above its mmap threshold (at most
32 MiB by default) with fresh mappings and unmaps them when they are freed, and it returns free
memory at the top of its heap to the kernel beyond its trim threshold; the next step then takes a
page fault, and a zero-filled page from the kernel, for every 4 KiB of those buffers again.
:func:`retain_freed_memory` raises both thresholds so that freed blocks stay in the process and
are reused. The first steps still take faults while the heap grows to hold every size (an
aligned request may not fit the block freed just before it); after that, few. The price: the
process keeps its peak resident memory between steps instead of shrinking back.

Process-wide, and only with glibc (Linux): a no-op returning False elsewhere, and when the
environment already sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (the user's
setting wins). The trainer applies it for CPU devices unless ``train.retain_freed_memory = false``;
importing branchadapt changes nothing. Measured in ``docs/performance.md`` (section 2).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
RETAIN_BYTES = 1 << 30  # blocks under 1 GiB come from the heap and stay there when freed
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (whose ``mallopt`` has these parameters)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: different allocators
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes (module docstring); True when set."""
    if not 0 < limit < 2**31:
        raise ValueError(f"limit must be a positive C int, got {limit}")
    if any(name in os.environ for name in ENVIRONMENT):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))


def release_freed_memory() -> bool:
    """Return the free memory of every malloc arena to the kernel now (glibc's ``malloc_trim``);
    True when glibc released some. For a phase that allocates in another thread than the one that
    freed: each thread allocates from its own arena, and memory retained in one arena (the worker
    threads of a step whose directions run at once) is not reused by the others."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))


__all__ = ["RETAIN_BYTES", "release_freed_memory", "retain_freed_memory"]
