"""What the network costs: a direct onnxruntime call against jobs through real nodes.

Usage: python -m bench.overhead [--model digits-mlp] [--jobs 300] [--concurrency 32]
                                [--plot DIR]

Two `p2p-node start` processes run on this machine: A serves the model, B does
not. Measured side by side in one run:

- direct:    onnxruntime in this process, one row per call;
- local job: a job sent to A, which runs the model itself;
- forwarded: a job sent to B, which forwards it to A (one extra hop).

Latency (p50/p99) is measured at concurrency 1, throughput at `--concurrency`
concurrent jobs over one client connection. Every figure is printed beside its
ratio to the direct call, since absolute times drift on a shared machine.

`--plot DIR` also writes DIR/overhead_latency_cdf.png: the latency CDF per path,
from the same samples as the table.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from bench._plot import PLOT_HELP, cdf, plot_dir
from p2p_node import Client, bundled_models_dir

HELDOUT = {"digits": "digits.npz", "cancer": "cancer.npz"}


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    per_s: float
    samples_ms: tuple[float, ...]  # the latencies p50 and p99 are taken from


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_direct(model_id: str, row: np.ndarray, jobs: int) -> Figures:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(bundled_models_dir() / model_id / "model.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )
    for _ in range(50):
        session.run(None, {"input": row})
    samples = []
    for _ in range(jobs):
        started = time.perf_counter()
        session.run(None, {"input": row})
        samples.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    for _ in range(jobs * 4):
        session.run(None, {"input": row})
    per_s = jobs * 4 / (time.perf_counter() - started)
    return Figures(percentile(samples, 50), percentile(samples, 99), per_s, tuple(samples))


async def measure_jobs(
    addr: str, model_id: str, row: np.ndarray, jobs: int, concurrency: int
) -> Figures:
    inputs = {"input": row}
    async with Client.connect(addr) as client:
        for _ in range(20):  # warm up: connection, streams, sessions
            await client.submit(model_id, inputs)
        samples = []
        for _ in range(jobs):
            started = time.perf_counter()
            await client.submit(model_id, inputs)
            samples.append((time.perf_counter() - started) * 1e3)

        async def worker(count: int) -> None:
            for _ in range(count):
                await client.submit(model_id, inputs)

        per_worker = max(1, jobs // concurrency) * 2
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, per_worker)
        per_s = per_worker * concurrency / (time.perf_counter() - started)
    return Figures(percentile(samples, 50), percentile(samples, 99), per_s, tuple(samples))


@contextmanager
def node_process(data_dir: Path, *args: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2p_node",
            "start",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
            str(data_dir),
            *args,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=60):
                raise RuntimeError("node did not start")
        yield proc.stdout.readline().removeprefix("listening on ").strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def wait_for_forwarding(addr: str, model_id: str, row: np.ndarray) -> None:
    """B learns A's models when A connects; retry until it can place the job."""
    from p2p_node import ErrorCode, JobError

    with trio.fail_after(30):
        async with Client.connect(addr) as client:
            while True:
                try:
                    await client.submit(model_id, {"input": row})
                    return
                except JobError as error:
                    if error.code != ErrorCode.NO_CAPABLE_PEER:
                        raise
                await trio.sleep(0.1)


def table(rows: list[tuple[str, Figures]], direct: Figures) -> str:
    lines = [
        f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'p50 x':>9}{'p99 x':>9}"
        f"{'jobs/s':>10}{'jobs/s x':>10}"
    ]
    for name, f in rows:
        lines.append(
            f"{name:<22}{f.p50_ms:>9.3f}{f.p99_ms:>9.3f}{f.p50_ms - direct.p50_ms:>9.3f}"
            f"{f.p50_ms / direct.p50_ms:>9.1f}{f.p99_ms / direct.p99_ms:>9.1f}"
            f"{f.per_s:>10.0f}{f.per_s / direct.per_s:>10.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--plot", type=Path, metavar="DIR", help=PLOT_HELP)
    args = parser.parse_args(argv)
    plots = plot_dir(args.plot)
    data = np.load(bundled_models_dir() / "heldout" / HELDOUT[args.model.split("-")[0]])
    row = data["x"][:1]
    other = "cancer-logreg" if args.model.startswith("digits") else "digits-logreg"

    direct = measure_direct(args.model, row, args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        with node_process(Path(tmp) / "a", "--serve", args.model) as a:
            with node_process(Path(tmp) / "b", "--serve", other, "--bootstrap", a) as b:
                run: Callable[..., Figures] = trio.run  # type: ignore[assignment]
                run(wait_for_forwarding, b, args.model, row)
                local = run(measure_jobs, a, args.model, row, args.jobs, args.concurrency)
                forwarded = run(measure_jobs, b, args.model, row, args.jobs, args.concurrency)
    print(
        f"model {args.model}, {args.jobs} jobs at concurrency 1, "
        f"throughput at concurrency {args.concurrency}; x = ratio to the direct call"
    )
    rows = [
        ("direct onnxruntime", direct),
        ("job run by entry node", local),
        ("job forwarded 1 hop", forwarded),
    ]
    print(table(rows, direct))
    print(f"forwarding adds {forwarded.p50_ms - local.p50_ms:.2f} ms p50 over a local job")
    if plots:
        figure = cdf(
            plots / "overhead_latency_cdf.png",
            {name: f.samples_ms for name, f in rows},
            xlabel="latency per job at concurrency 1 (ms, log scale)",
            title=f"bench.overhead: {args.model}, {args.jobs} jobs per path",
            log_x=True,
        )
        print(f"figure: {figure}")


if __name__ == "__main__":
    main()
