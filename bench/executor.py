"""What dynamic batching buys in the executor alone: no network, no nodes.

Usage: python -m bench.executor [--model digits-mlp] [--requests 4000] [--repeat 3]
                                [--concurrency 1 8 32 256] [--inline-below-ms 0.5]

In this process, `concurrency` trio tasks each call `Executor.run` with one
held-out row at a time, until `requests` have been answered; once with
batching off (one onnxruntime run per request) and once on, side by side at
each concurrency, `repeat` times, interleaved so that drift on a shared machine
hits both alike. The executor has the node's defaults (2 workers, models under
0.5 ms run inline) and a queue limit of at least `concurrency`;
`--inline-below-ms 0` sends every run to a worker thread, as for a model that
runs over 0.5 ms.

Printed per concurrency and mode: requests/s (the median of the repeats), its
ratio on/off, latency p50/p99 per request, and rows per onnxruntime run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import trio

from bench._common import heldout_rows
from p2p_node import ExecutorConfig, bundled_models_dir
from p2p_node._executor import Executor
from p2p_node._repository import read_repository


@dataclass(frozen=True)
class Figures:
    per_s: float
    p50_ms: float
    p99_ms: float
    rows_per_run: float


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(
    model_id: str,
    rows: np.ndarray,
    requests: int,
    concurrency: int,
    batching: bool,
    inline_below_ms: float,
) -> Figures:
    cards = read_repository(bundled_models_dir(), frozenset({model_id}))
    config = ExecutorConfig(queue_limit=max(64, concurrency), inline_below_ms=inline_below_ms)
    executor = Executor.from_cards(cards, config, batching=batching)
    for i in range(20):  # warm up: the first runs go to a worker thread
        await executor.run(model_id, {"input": rows[i : i + 1]})
    runs_before = executor.runs
    latencies: list[float] = []
    per_task = max(1, requests // concurrency)

    async def client(first: int) -> None:
        for i in range(first, first + per_task):
            row = rows[i % len(rows) : i % len(rows) + 1]
            started = time.perf_counter()
            await executor.run(model_id, {"input": row})
            latencies.append((time.perf_counter() - started) * 1e3)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for task in range(concurrency):
            nursery.start_soon(client, task * per_task)
    elapsed = time.perf_counter() - started
    runs = executor.runs - runs_before
    return Figures(
        len(latencies) / elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(latencies) / runs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--inline-below-ms", type=float, default=0.5)
    args = parser.parse_args(argv)
    rows = heldout_rows(args.model)

    print(
        f"model {args.model}, one-row requests, {args.requests} per measurement, "
        f"median of {args.repeat}; Executor.run in-process (no network), "
        f"inline_below_ms {args.inline_below_ms:g}"
    )
    print(
        f"{'concurrency':>11}{'batching':>10}{'req/s':>10}{'on/off':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'rows/run':>10}"
    )
    for concurrency in args.concurrency:
        samples: dict[bool, list[Figures]] = {False: [], True: []}
        for _ in range(args.repeat):
            for batching in (False, True):
                figures = trio.run(
                    measure,
                    args.model,
                    rows,
                    args.requests,
                    concurrency,
                    batching,
                    args.inline_below_ms,
                )
                samples[batching].append(figures)
        median = {
            b: sorted(figures, key=lambda f: f.per_s)[len(figures) // 2]
            for b, figures in samples.items()
        }
        for batching in (False, True):
            f = median[batching]
            ratio = f.per_s / median[False].per_s
            print(
                f"{concurrency:>11}{'on' if batching else 'off':>10}{f.per_s:>10.0f}"
                f"{ratio:>8.2f}{f.p50_ms:>9.3f}{f.p99_ms:>9.3f}{f.rows_per_run:>10.1f}"
            )


if __name__ == "__main__":
    main()
