"""What a process whose main work is a node sets for itself: Python's collector and
the C allocator (`p2p-node start`, and the benchmarks' node processes, through
`tune_process`). A library that opens a node in someone else's process leaves
both alone."""

from __future__ import annotations

import ctypes
import gc
import platform
import sys

# A node allocates a few hundred objects per job, and the caches of what it
# answered (JobOnce, the selection tracker) keep thousands alive: under load the
# collector's default thresholds (700, 10, 10) ran a full collection, 100 to 170
# ms over everything libp2p and onnxruntime made, every second or two. The
# young generations keep their thresholds (their pauses stay short).
# (gc.freeze() of start-up's objects made every young collection take ~17 ms.)
GC_THRESHOLDS = (700, 10, 1000)

# glibc's mallopt parameters, and what a node sets them to. A large request's body
# is one fresh block (16 MiB by default), and JobOnce keeps the last few requests'
# inputs, views of their bodies, so the next body cannot take the block of the
# one before. Above glibc's mmap threshold each came from a fresh mapping, and
# its first touch paid a page fault per 4 KiB: joining a 16 MiB body took 15-19
# ms here, where with blocks kept in the heap (and not trimmed) it takes 2-3.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_ABOVE = 32 << 20  # blocks up to this come from the heap (glibc's largest)
TRIM_ABOVE = 256 << 20  # and free heap is given back only past this


def tune_process() -> None:
    """Set the collector (GC_THRESHOLDS) and, with glibc, the allocator
    (`keep_large_blocks`) as a node's own process wants them."""
    gc.set_threshold(*GC_THRESHOLDS)
    keep_large_blocks()


def keep_large_blocks() -> bool:
    """Have glibc serve blocks up to MMAP_ABOVE from its heap and keep up to
    TRIM_ABOVE of freed heap, so that a large body's block is used again, its
    pages already in place. False, and nothing changed, without glibc."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)
    )
