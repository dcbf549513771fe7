"""Fetch throughput: a 20+ MB model fetched by content from 1 and from 2 peers.

Usage: python -m bench.fetch [--model minilm-l6-v2] [--repeat 3] [--streams 2]

Two `p2p-node start` processes (A, B) serve the model; a node in this process,
fresh each time (its own data dir, serving only a tiny model), fetches it with
`node.fetches.fetch(MODEL)`: from A alone, then from A and B (new processes, so
that no record of the other is around), once it sees them announce it. Two
figures per fetch: "download", from the first manifest request to the last
chunk written and checked; "to serving", the whole call, with the per-file
hashes, the move into the data dir and onnxruntime loading the model.

Measured in the same run, as ceilings: the model's files copied on this disk
(`shutil.copyfile`, warm page cache), and the same bytes sent over raw trio
TCP on loopback. Each fetch figure is printed with its ratio to both; compare
only figures from one run, since absolute numbers drift on a shared machine.
One untimed fetch first, per set of servers, has them build their manifests.

`run_bench(...)` returns the rows, for `bench.stages` to print in its table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from bench.overhead import measure_raw_tcp, node_process
from p2p_node import NodeConfig, bundled_models_dir
from p2p_node._config import FetchConfig
from p2p_node._fetch import announcers
from p2p_node._node import open_node

MB = 1 << 20


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    mb_per_s: float  # median over the repeats
    vs_copy: float
    vs_tcp: float


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())


def measure_copy(model_dir: Path, repeat: int) -> float:
    """MB/s of copying the model's files on this disk (the page cache warm)."""
    rates = []
    with tempfile.TemporaryDirectory(prefix="fetch-bench-copy-") as tmp:
        for i in range(repeat + 1):  # the first warms the cache
            out = Path(tmp) / str(i)
            out.mkdir()
            started = time.perf_counter()
            for path in model_dir.iterdir():
                shutil.copyfile(path, out / path.name)
            rates.append(model_bytes(model_dir) / (time.perf_counter() - started) / 1e6)
    return statistics.median(rates[1:])


async def measure_fetch(
    model: str, peers: list[str], data_dir: Path, streams: int
) -> tuple[float, float]:
    """MB/s of one fetch of `model` by a fresh node from `peers`: of its download
    (manifest and chunks, each checked), and end to end (until it serves the model)."""
    config = NodeConfig(
        data_dir=data_dir,
        serve_models=frozenset({"digits-logreg"}),
        bootstrap=tuple(peers),
        target_degree=0,
        shutdown_grace=1.0,
        fetch=replace(FetchConfig(), streams_per_peer=streams),
    )
    async with open_node(config) as node:
        with trio.fail_after(60):
            await node.view.wait_until(lambda v: len(announcers(v, model, None)) >= len(peers))
        started = time.perf_counter()
        await node.fetches.fetch(model)
        elapsed = time.perf_counter() - started
        progress = node.fetches.progress[model]
    return progress.total_bytes / progress.download_s / 1e6, progress.total_bytes / elapsed / 1e6


@contextmanager
def servers(model: str, n: int, root: Path) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                node_process(root / f"server{i}", "--serve", model, "--degree", "0")
            )
            for i in range(n)
        ]


def run_bench(model: str = "minilm-l6-v2", repeat: int = 3, streams: int = 2) -> list[Row]:
    model_dir = bundled_models_dir() / model
    size = model_bytes(model_dir)
    copy = measure_copy(model_dir, repeat)
    tcp = trio.run(measure_raw_tcp, size, repeat)
    rows = [
        Row("raw file copy", copy, 1.0, copy / tcp),
        Row("raw loopback TCP", tcp, tcp / copy, 1.0),
    ]
    for n in (1, 2):  # servers of their own: a peer's gossip would name the other
        with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
            root = Path(tmp)
            with servers(model, n, root) as addrs:
                trio.run(measure_fetch, model, addrs, root / "warm-up", streams)  # manifests built
                runs = [
                    trio.run(measure_fetch, model, addrs, root / f"fetcher{i}", streams)
                    for i in range(repeat)
                ]
            peers = f"{n} peer{'s' * (n > 1)}"
            for label, rate in (
                (f"download, {peers}", statistics.median(r[0] for r in runs)),
                (f"to serving, {peers}", statistics.median(r[1] for r in runs)),
            ):
                rows.append(Row(label, rate, rate / copy, rate / tcp))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6-v2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2, help="streams per peer")
    args = parser.parse_args()
    print_rows(args.model, args.repeat, run_bench(args.model, args.repeat, args.streams))


def print_rows(model: str, repeat: int, rows: list[Row]) -> None:
    size = model_bytes(bundled_models_dir() / model)
    print(f"fetch of {model}: {size / MB:.1f} MiB, median of {repeat}")
    print(f"{'':<22} {'MB/s':>8} {'/ copy':>8} {'/ TCP':>8}")
    for row in rows:
        print(f"{row.what:<22} {row.mb_per_s:>8.1f} {row.vs_copy:>8.3f} {row.vs_tcp:>8.3f}")


if __name__ == "__main__":
    main()
