"""glibc malloc settings for a long run: keep freed heap memory instead of returning it each step.

Why: a market round allocates and frees tens of megabytes of tensors and arrays (the GRPO step's
activations, the candidate pools, the metrics' per-item arrays). With glibc's defaults the top of
the heap is handed back to the kernel (``brk`` shrinks) whenever more than the trim threshold is
free, and the dynamic mmap threshold sends blocks above it to fresh ``mmap`` pages, so the next
step faults the same pages in again: the default cold-start run took 4.0 million minor page faults
and 8 s of system time in 200 rounds (strace: brk shrinks of 20-70 MB, dozens per 40 rounds). The
settings below (``mallopt``, the call behind glibc's ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_TOP_PAD_`` / ``MALLOC_MMAP_THRESHOLD_`` environment variables) keep that memory in the
process: the same run took 0.18 million faults and about 1 s of system time. Peak memory is the
same (the high-water mark of the heap does not change; only its shrinking between steps stops).

PyTorch's CPU tuning guide makes the same point by recommending jemalloc or tcmalloc; this needs
no extra library. It is applied by the command-line entry (``agorasim ...``,
``experiments/run.py``) and the benchmarks, never on import, so a program that imports agorasim
keeps its own allocator. ``AGORASIM_MALLOC=system`` keeps glibc's defaults (for comparison); on a
C library without ``mallopt`` (macOS, musl) nothing is done.

Float results can differ in the last digits between the two settings (MKL and oneDNN pick code
paths by the alignment of the buffers they are given), so metrics are reproducible for a fixed
seed *under the same setting*, which every entry point applies the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {
    M_TRIM_THRESHOLD: 2**31 - 1,  # never shrink the heap's top between steps (mallopt takes an int)
    M_TOP_PAD: 256 << 20,  # grow the heap 256 MB at a time, not page by page
    M_MMAP_THRESHOLD: 1 << 30,  # blocks up to 1 GiB come from the heap (a fixed value also stops
    # glibc's dynamic threshold, which otherwise moves with the sizes freed)
}

_applied: bool | None = None


def tune() -> bool:
    """Apply ``SETTINGS`` once per process; True where glibc accepted all of them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("AGORASIM_MALLOC", "tuned") == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _applied
