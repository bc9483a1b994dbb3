"""Keep freed host memory for reuse while training on a CPU.

A training step allocates and frees the same large tensors every step (activations, gradients, the output
layer's scores). glibc's malloc serves blocks above its mmap threshold with fresh pages and returns them to
the system when freed, so each step faults hundreds of megabytes of pages back in: on the 2-core test machine
that was 160,000 page faults and about a fifth of a character-model step (bench/host_memory.py). Raising the
mmap and trim thresholds makes malloc keep those blocks in its heap and hand them out again. The process then
holds on to its peak memory until it exits, which a training run does anyway.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to KEEP_BYTES for reuse; False where that is not possible (not
    Linux, or a C library without mallopt, such as musl), which changes nothing else."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * KEEP_BYTES))
