"""Keep freed host memory in the process when training on CPU (``train.retain_host_memory``).

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every free a ``free``. glibc serves
blocks above its mmap threshold with a fresh ``mmap`` and gives them back with ``munmap``, and it returns
the top of the heap to the kernel once more than its trim threshold is free. A training step frees its
activations at the end and allocates them again in the next, so without a cache each step page-faults
every activation page back in (the kernel zeroes it first). Measured on RaceDiT-S/2-2in8 at batch 8 on
the 2-core CPU: 10-90 thousand minor faults and 0.03-0.17 s of system time per step, more for the MoE
model (its expert groups change size every step) than for the dense one; with the two thresholds raised,
none (docs/design.md, "Host memory on CPU").

``retain_freed_memory`` raises both thresholds through ``mallopt``: blocks up to 32 MiB (glibc's largest
mmap threshold on 64-bit) come from the heap, and freed heap memory stays mapped. The price is that the
process keeps its peak heap size until it exits, which is what a training process does anyway. Only glibc
has ``mallopt``; elsewhere it is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, i.e. keep up to 2 GiB of free heap top


@functools.cache
def retain_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done, for the run's log."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "host memory: left to the C library (no glibc mallopt here)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim_ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    if not (trim_ok and mmap_ok):
        return "host memory: glibc refused mallopt; freed memory goes back to the kernel as usual"
    return "host memory: freed blocks up to 32 MiB stay in the process (glibc mmap/trim thresholds raised)"


__all__ = ["retain_freed_memory"]
