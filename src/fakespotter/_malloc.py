"""Keep freed memory in the process for the next forward (glibc's malloc; the CLI and Ray actors).

A CPU forward of a batch allocates some hundreds of MB of activations and frees them. glibc
serves a block above its mmap threshold (128 KiB, raised as blocks are freed, to 32 MiB at
most) with a fresh ``mmap`` and returns it on free, and trims the top of its heap once more than
its trim threshold is free. So every forward touched its activations' pages for the first
time again: with the dlib backbone and a batch of 64, ~50,000 page faults (~200 MB of pages
the kernel zeroes) per forward, about a fifth of its time on 2 CPUs (benchmarks/RESULTS.md,
"Freed memory kept"). With both thresholds raised, the heap grows to the forward's peak once
and is reused: no page faults after the first batch, the same peak memory, and memory freed
afterwards is not handed back to the system until the process ends.

Only the main process of a command and the Ray actors do this; decode workers keep glibc's
default (their largest image would stay resident). ``FAKESPOTTER_MALLOC=default`` leaves glibc
as it is, and so does any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or
``glibc.malloc`` tunable already set, or an allocator preloaded in glibc's place (then the
call tunes an allocator that is not used, harmlessly).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # never trim (the largest value mallopt takes)

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once. Returns whether they are
    raised (False: not Linux glibc, or left alone as the module docstring says)."""
    global _applied
    if _applied:
        return True
    env = os.environ
    if (env.get("FAKESPOTTER_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux")
            or "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc returns 1 on success; musl's mallopt is a stub that returns 0
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
