"""What `p2p-node start` sets for its own process (`_process.tune_process`)."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
import textwrap

import pytest

from p2p_node._process import GC_THRESHOLDS, tune_process

# A child that joins 16 MiB bodies, keeping the last three (as JobOnce keeps the
# inputs of recent requests), and prints each join's page faults.
JOINS = textwrap.dedent(
    """
    import os
    from p2p_node._process import keep_large_blocks
    assert keep_large_blocks()
    def faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
    pieces = [os.urandom(64 * 1024) for _ in range(256)]
    held = []
    for _ in range(10):
        before = faults()
        held.append(b"".join(pieces))
        del held[:-3]
        print(faults() - before)
    """
)


def _faults_per_join() -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", JOINS], capture_output=True, text=True, check=True, timeout=60
    )
    return [int(line) for line in out.stdout.split()]


def test_a_node_process_runs_full_collections_rarely() -> None:
    """A full collection, 70-170 ms in a loaded node, comes 100x less often than by
    Python's default."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_process()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[:2] == (700, 10) and GC_THRESHOLDS[2] >= 1000
    finally:
        gc.set_threshold(*before)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator"
)
def test_a_large_body_takes_a_block_already_in_place() -> None:
    """With glibc's defaults the 16 MiB bodies were fresh mappings, a page fault per
    4 KiB on first touch (here the first eight of ten; in a node, one in two or
    three); a node's process keeps freed large blocks in its heap, so once a few
    bodies have come and gone the next one faults almost never."""
    pages = (16 << 20) // 4096
    assert max(_faults_per_join()[4:]) < pages // 20
