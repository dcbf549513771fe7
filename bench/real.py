"""Scheduling with real node processes on this machine (part 3 of bench.scheduler).

- Throughput and p99 per strategy: 4 `p2p-node start` processes (one worker,
  one ONNX thread each) serving digits-mlp; one client drives jobs at
  concurrency 32 through node 0, which places each with the strategy.
- Batch speed-up: the same compute-heavy batch (digits-svm) over 1 node and
  over 2 nodes, each limited to one ONNX thread; over 2 nodes both with the
  chunks sent straight to the peers (the default) and all through node 0, which
  forwards half. Sent as float32 and as uint8 (the digits are integers 0-16),
  answered with every output, and as uint8 asking for the labels only. The
  client and both nodes share the machine's cores, so every byte moved through
  py-libp2p is CPU the models do not get.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import trio

from bench.overhead import node_process, percentile
from p2p_node import Client, ErrorCode, JobError, bundled_models_dir
from scheduler import DistributionStrategy

ONE_THREAD = ("--workers", "1", "--threads", "1")


async def wait_until_placeable(addr: str, model: str, rows: np.ndarray, peers: int) -> None:
    """Until the entry node's view holds `peers` nodes serving `model`."""
    with trio.fail_after(60):
        async with Client.connect(addr) as client:
            while len((await client.place(model)).candidates) < peers:  # noqa: ASYNC110
                await trio.sleep(0.1)  # another process's view: polled over the wire
            try:
                await client.submit(model, {"input": rows[:1]})
            except JobError as error:
                if error.code is not ErrorCode.NO_CAPABLE_PEER:
                    raise


async def drive(
    addr: str,
    model: str,
    rows: np.ndarray,
    strategy: DistributionStrategy,
    jobs: int,
    concurrency: int,
) -> tuple[float, float, dict[str, int]]:
    latencies: list[float] = []
    executors: dict[str, int] = {}
    async with Client.connect(addr) as client:
        slots = trio.Semaphore(concurrency)

        async def one(k: int) -> None:
            async with slots:
                started = time.perf_counter()
                result = await client.submit(
                    model, {"input": rows[k % len(rows)][None]}, strategy=strategy
                )
                latencies.append((time.perf_counter() - started) * 1e3)
                executors[result.executor] = executors.get(result.executor, 0) + 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(jobs):
                nursery.start_soon(one, k)
        seconds = time.perf_counter() - started
    return jobs / seconds, percentile(latencies, 99), executors


async def probe_round_trip(addr: str, probes: int) -> tuple[float, float]:
    """Median and p99 ms of a load probe (`load?`) from another process to the node."""
    async with Client.connect(addr) as client:
        took = []
        for _ in range(probes):
            started = time.perf_counter()
            await client.load()
            took.append((time.perf_counter() - started) * 1e3)
    return percentile(took, 50), percentile(took, 99)


def strategies_under_load(
    jobs: int,
) -> tuple[list[tuple[str, float, float, int]], tuple[float, float]]:
    rows = np.load(bundled_models_dir() / "heldout" / "digits.npz")["x"]
    out = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        first = stack.enter_context(
            node_process(Path(tmp) / "n0", "--serve", "digits-mlp", *ONE_THREAD)
        )
        for i in range(1, 4):
            stack.enter_context(
                node_process(
                    Path(tmp) / f"n{i}", "--serve", "digits-mlp", "--bootstrap", first, *ONE_THREAD
                )
            )
        trio.run(wait_until_placeable, first, "digits-mlp", rows, 4)
        probe = trio.run(probe_round_trip, first, 500)
        for strategy in DistributionStrategy:
            per_s, p99, executors = trio.run(drive, first, "digits-mlp", rows, strategy, jobs, 32)
            out.append((strategy.value, per_s, p99, len(executors)))
    return out, probe


BATCH_MODEL = "digits-svm"


def batch_speedup(
    rows: int,
    batch_size: int,
    dtype: str = "float32",
    repeats: int = 5,
    outputs: tuple[str, ...] = (),
) -> dict[str, float]:
    """Median seconds for the batch over 1 node, and over 2 nodes with chunks sent
    straight to both (direct) or all through node 0 (via node). Runs alternate, so
    that drift in this shared machine's speed hits every case alike. The digits
    are integers 0-16: as uint8 they are a quarter of the bytes of float32, and the
    node casts them. `outputs`: those asked for (default: all, labels and the ten
    probabilities, 48 bytes a row)."""
    data = np.load(bundled_models_dir() / "heldout" / "digits.npz")["x"]
    big = np.resize(data, (rows, data.shape[1])).astype(dtype)
    seconds: dict[str, list[float]] = {"1 node": [], "2 nodes, direct": [], "2 nodes, via node": []}
    for _ in range(repeats):
        with _batch_nodes(1, big) as first:
            seconds["1 node"].append(trio.run(_batch, first, big, batch_size, True, outputs))
        with _batch_nodes(2, big) as first:
            direct = trio.run(_batch, first, big, batch_size, True, outputs)
            via_node = trio.run(_batch, first, big, batch_size, False, outputs)
            seconds["2 nodes, direct"].append(direct)
            seconds["2 nodes, via node"].append(via_node)
    return {case: float(np.median(times)) for case, times in seconds.items()}


@contextmanager
def _batch_nodes(nodes: int, big: np.ndarray) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        first = stack.enter_context(
            node_process(Path(tmp) / "n0", "--serve", BATCH_MODEL, *ONE_THREAD)
        )
        for i in range(1, nodes):
            stack.enter_context(
                node_process(
                    Path(tmp) / f"n{i}", "--serve", BATCH_MODEL, "--bootstrap", first, *ONE_THREAD
                )
            )
        trio.run(wait_until_placeable, first, BATCH_MODEL, big, nodes)
        yield first


async def _batch(
    addr: str, big: np.ndarray, batch_size: int, direct: bool, outputs: tuple[str, ...]
) -> float:
    async with Client.connect(addr) as client:
        started = time.perf_counter()
        await client.submit_batch(
            BATCH_MODEL,
            {"input": big},
            batch_size=batch_size,
            strategy=DistributionStrategy.LEAST_LOADED,
            concurrency=4,
            direct=direct,
            outputs=outputs,
        )
        return time.perf_counter() - started


def report(jobs: int = 2000, batch_rows: int = 200_000, batch_size: int = 5000) -> None:
    print(
        f"-- 4 node processes (1 worker, 1 ONNX thread each), digits-mlp, {jobs} jobs "
        "at concurrency 32 through node 0 --"
    )
    rows, (probe_p50, probe_p99) = strategies_under_load(jobs)
    print(f"{'strategy':<20}{'jobs/s':>10}{'p99 ms':>10}{'executors':>11}")
    for name, per_s, p99, used in rows:
        print(f"{name:<20}{per_s:>10.0f}{p99:>10.1f}{used:>11}")
    print(
        f"a load probe between two processes, idle: p50 {probe_p50:.2f} ms, p99 "
        f"{probe_p99:.2f} ms (the simulation charges each probed request 2.5 ms)"
    )
    cases = [("float32", ()), ("uint8", ()), ("uint8", ("label",))]
    for dtype, outputs in cases:
        times = batch_speedup(batch_rows, batch_size, dtype, outputs=outputs)
        one = times["1 node"]
        answered = ", ".join(outputs) or "every output"
        print(
            f"-- batch: {batch_rows} rows of {BATCH_MODEL} as {dtype}"
            f" ({64 * np.dtype(dtype).itemsize} bytes a row), {answered}, in jobs of"
            f" {batch_size}, one ONNX thread per node, median of 5 --"
        )
        for case, seconds in times.items():
            print(f"{case:<20}{seconds:>7.2f} s   speed-up {one / seconds:.2f}x")
        print("(target: 2 nodes >= 1.8x)")


if __name__ == "__main__":
    report()
