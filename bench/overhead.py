"""What the network costs: a direct onnxruntime call against jobs through real nodes.

Usage: python -m bench.overhead [--model digits-mlp] [--jobs 300] [--seconds 2]
                                [--concurrency 1,8,32,256] [--bulk 3] [--plot DIR]

Two `p2p-node start` processes run on this machine: A serves the model, B does
not. Measured side by side in one run:

- direct:    onnxruntime in this process, one row per call;
- local job: a job sent to A, which runs the model itself;
- forwarded: a job sent to B, which forwards it to A (one extra hop).

At each concurrency c in `--concurrency`, c jobs are kept in flight for
`--jobs` x 2 jobs (at least 4 per worker) and for at least `--seconds`, and
throughput and latency p50/p99 are taken from that run. (At concurrency 32,
600 jobs took about 0.1 s, and two runs of the same code differed by a third.)
Up to 32 concurrent jobs go over one client connection; more come from c / 32
clients (256: 8 clients of 32), each its own libp2p host. Every job must be
answered exactly once; any error (OVERLOADED included: the nodes run with a
queue limit above the largest c) fails the run. Each row also gives the CPU
time (user and system, every thread, from psutil) that node A, node B and the
clients (this process) took over it, per job: what each spends on a job,
whatever turns the processes took (at concurrency 1 a job's latency is about
the sum of the three; at 32 the entry node's CPU per job bounds its rate). On a
shared machine it moves too, by about a fifth from run to run here.

Bulk: `--bulk` requests of 16 MiB (a batch of rows, the largest the default
request limit takes) through one hop (client to the entry node, which runs
them), in MB/s of request bytes, against the same bytes sent over raw trio TCP on
loopback to a reader that answers each with one byte, one such message after
each request, so that both see the machine in the same seconds. The timed
requests come once the node is in its steady state: warm-up requests go until a
few in a row cost the node's process fewer than STEADY_FAULTS page faults each
(see BULK_WARM_UP_MAX), and the run prints how many it took and the node's
faults per timed request. Each request also runs the model on its 65,520 rows,
which no transport can save, so the figure is printed a second time less the
queue and run time the node reports (`queue_ms + compute_ms`).

Every figure is printed beside its ratio to the direct call (or to raw TCP for
bulk), since absolute times drift on a shared machine.

`--plot DIR` also writes DIR/overhead_latency_cdf.png: the latency CDF per path,
from the same samples as the table.
"""

from __future__ import annotations

import argparse
import functools
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import trio

from bench._common import cpu_seconds, heldout_rows
from bench._plot import PLOT_HELP, cdf, plot_dir
from p2p_node import Client, ErrorCode, JobError, bundled_models_dir

CLIENT_CONCURRENCY = 32  # jobs in flight per client; more come from more clients
BULK_BYTES = 16 * 1024 * 1024  # the default max_request_bytes
QUEUE_LIMIT = 1024  # the nodes' queue and inbound limits: above every c measured
# Bulk requests sent before the timed ones. A node's first 11 to 19 bodies of 16 MiB
# (here) each land on memory its process has never touched, while glibc's heap
# grows until a freed block fits the next body (JobOnce keeps the last few
# requests' inputs; replies and outputs of other sizes split what is freed): 4,096
# page faults a body, 15-20 ms of the node's time. Warm-up goes on until
# STEADY_RUN requests in a row cost the node fewer than STEADY_FAULTS faults each
# (read from /proc), for at least BULK_WARM_UP_MIN requests and at most
# BULK_WARM_UP_MAX (all of them where /proc cannot be read).
BULK_WARM_UP_MIN = 6
BULK_WARM_UP_MAX = 32
STEADY_FAULTS = 1024  # a quarter of a fresh body's pages
STEADY_RUN = 3  # requests in a row under STEADY_FAULTS


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    per_s: float
    samples_ms: tuple[float, ...]  # the latencies p50 and p99 are taken from
    failed: tuple[str, ...] = ()  # the error codes of jobs that were not answered
    cpu_ms: tuple[float, ...] = ()  # each of `measure_jobs`'s processes' CPU ms per job sent


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_direct(model_id: str, row: np.ndarray, jobs: int) -> Figures:
    session = direct_session(model_id)
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


def direct_session(model_id: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(bundled_models_dir() / model_id / "model.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )


async def measure_jobs(
    addr: str,
    model_id: str,
    row: np.ndarray,
    jobs: int,
    concurrency: int,
    seconds: float = 0.0,
    pids: Sequence[int] = (),
) -> Figures:
    """`concurrency` jobs kept in flight until about 2 x `jobs` are answered, and for
    at least `seconds`; and the CPU time (user and system, all threads) that each of
    the processes `pids` took over them, per job (see the module's docstring).

    Each job must be answered exactly once: an error of any kind is counted in
    `failed` (and printed beside the table)."""
    inputs = {"input": row}
    clients = max(1, -(-concurrency // CLIENT_CONCURRENCY))
    per_worker = max(4, 2 * jobs // concurrency)
    samples: list[float] = []
    answered = 0
    failed: list[str] = []
    async with AsyncExitStack() as stack:
        connected = [await stack.enter_async_context(Client.connect(addr)) for _ in range(clients)]
        for client in connected:
            for _ in range(20):  # warm up: connection, streams, sessions
                await client.submit(model_id, inputs)

        sent = 0

        async def worker(client: Client) -> None:
            nonlocal answered, sent
            done = 0
            while done < per_worker or time.perf_counter() < until:
                done += 1
                sent += 1
                started = time.perf_counter()
                try:
                    await client.submit(model_id, inputs)
                except JobError as error:
                    failed.append(error.code.name)
                    continue
                samples.append((time.perf_counter() - started) * 1e3)
                answered += 1

        cpu = [cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        until = started + seconds
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, connected[i % clients])
        per_s = sent / (time.perf_counter() - started)
        spent = [cpu_seconds(pid) - was for pid, was in zip(pids, cpu, strict=True)]
        cpu_ms = tuple(s * 1e3 / sent for s in spent)
    assert answered + len(failed) == sent
    print(
        f"  {addr[-8:]} c={concurrency}: {per_s:.0f} jobs/s, {len(failed)} failed", file=sys.stderr
    )
    return Figures(
        percentile(samples, 50),
        percentile(samples, 99),
        per_s,
        tuple(samples),
        tuple(failed),
        cpu_ms,
    )


@dataclass(frozen=True)
class Bulk:
    mb_per_s: float
    moved_mb_per_s: float  # less the node's queue and run time
    raw_mb_per_s: float  # the same bytes over raw TCP, each message beside a request
    warm_up: int  # requests sent before the timed ones
    node_faults: float | None  # the node's page faults per timed request (None: unknown)


async def measure_bulk(addr: str, model_id: str, batch: np.ndarray, count: int) -> Bulk:
    """MB/s of request bytes: `count` jobs of `batch` each, one after another, once the
    node is in its steady state (BULK_WARM_UP_MAX); the same less the time the node
    says each waited for and ran its model (queue_ms + compute_ms), which no
    transport can save; and raw TCP's MB/s for the same bytes, one message of them
    sent after each request (raw TCP alone moved between 0.9 and 1.7 GB/s from one
    run to the next here: taken apart in time, the ratio swung with it)."""
    faults = functools.partial(minor_faults, getattr(addr, "pid", None))
    async with Client.connect(addr) as client, raw_tcp(batch.nbytes) as raw:
        warm_up = steady = 0
        while warm_up < BULK_WARM_UP_MAX and (warm_up < BULK_WARM_UP_MIN or steady < STEADY_RUN):
            before = faults()
            await client.submit(model_id, {"input": batch})
            warm_up += 1
            after = faults()
            few = before is not None and after is not None and after - before < STEADY_FAULTS
            steady = steady + 1 if few else 0
        before = faults()
        await raw()
        ran_s = took = raw_s = 0.0
        for _ in range(count):
            started = time.perf_counter()
            result = await client.submit(model_id, {"input": batch})
            took += time.perf_counter() - started
            ran_s += (result.queue_ms + result.compute_ms) / 1e3
            raw_s += await raw()
        after = faults()
    mb = count * batch.nbytes / 1e6
    faulted = None if before is None or after is None else (after - before) / count
    return Bulk(mb / took, mb / (took - ran_s), mb / raw_s, warm_up, faulted)


def minor_faults(pid: int | None) -> int | None:
    """Process `pid`'s minor page faults so far (Linux's /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


async def measure_raw_tcp(size: int, count: int) -> float:
    """MB/s of `count` messages of `size` bytes over trio TCP on loopback, each
    read in full by the other end, which answers one byte."""
    async with raw_tcp(size) as send:
        await send()  # warm up
        took = 0.0
        for _ in range(count):
            took += await send()
    return count * size / took / 1e6


@asynccontextmanager
async def raw_tcp(size: int) -> AsyncIterator[Callable[[], Awaitable[float]]]:
    """A function that sends one message of `size` bytes over trio TCP on loopback,
    to a reader that takes it whole and answers one byte, and says how long that
    took (s)."""

    async def reader(stream: trio.SocketStream) -> None:
        while True:
            left = size
            while left:
                data = await stream.receive_some(1 << 20)
                if not data:
                    return
                left -= len(data)
            await stream.send_all(b"k")

    payload = b"x" * size
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, reader, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)

        async def send() -> float:
            started = time.perf_counter()
            await stream.send_all(payload)
            await stream.receive_some(1)
            return time.perf_counter() - started

        async with stream:
            yield send
        nursery.cancel_scope.cancel()


class NodeAddress(str):
    """A node process's listening address, which also knows the process's id."""

    pid: int


@contextmanager
def node_process(data_dir: Path, *args: str) -> Iterator[NodeAddress]:
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
            "--queue-limit",
            str(QUEUE_LIMIT),
            "--max-inbound-streams",
            str(QUEUE_LIMIT),
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
        address = NodeAddress(proc.stdout.readline().removeprefix("listening on ").strip())
        address.pid = proc.pid
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def wait_for_forwarding(addr: str, model_id: str, row: np.ndarray) -> None:
    """B learns A's models when A connects; retry until it can place the job."""
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


def table(rows: list[tuple[str, int, Figures]], direct: Figures) -> str:
    lines = [
        f"{'path':<22}{'c':>5}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}"
        f"{'jobs/s':>10}{'jobs/s x':>10}{'A cpu ms':>10}{'B cpu ms':>10}{'clients':>10}"
    ]
    for name, c, f in rows:
        cpu = "".join(f"{ms:>10.3f}" for ms in f.cpu_ms)
        lines.append(
            f"{name:<22}{c:>5}{f.p50_ms:>9.3f}{f.p99_ms:>9.3f}{f.p50_ms - direct.p50_ms:>9.3f}"
            f"{f.p99_ms - direct.p99_ms:>9.3f}{f.per_s:>10.0f}{f.per_s / direct.per_s:>10.4f}{cpu}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="least time per path and concurrency"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[1, 8, 32, 256],
        help="comma-separated concurrencies (default 1,8,32,256)",
    )
    parser.add_argument("--bulk", type=int, default=3, help="16 MiB requests to time (0: none)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help=PLOT_HELP)
    args = parser.parse_args(argv)
    plots = plot_dir(args.plot)
    heldout = heldout_rows(args.model)
    row = heldout[:1]
    # The largest batch whose request fits the default limit, with room for its header.
    rows = (BULK_BYTES - 4096) // row.nbytes
    batch = np.ascontiguousarray(np.resize(heldout, (rows, row.shape[1])).astype(row.dtype))
    other = "cancer-logreg" if args.model.startswith("digits") else "digits-logreg"

    direct = measure_direct(args.model, row, args.jobs)
    run: Callable[..., Any] = trio.run
    results: list[tuple[str, int, Figures]] = []
    bulk: Bulk | None = None
    with tempfile.TemporaryDirectory() as tmp:
        with node_process(Path(tmp) / "a", "--serve", args.model) as a:
            with node_process(Path(tmp) / "b", "--serve", other, "--bootstrap", a) as b:
                run(wait_for_forwarding, b, args.model, row)
                measure = functools.partial(
                    measure_jobs, model_id=args.model, row=row, pids=(a.pid, b.pid, os.getpid())
                )
                for name, addr in (("job run by entry node", a), ("job forwarded 1 hop", b)):
                    for c in args.concurrency:
                        figures = run(
                            functools.partial(
                                measure, addr, jobs=args.jobs, concurrency=c, seconds=args.seconds
                            )
                        )
                        results.append((name, c, figures))
                if args.bulk:
                    bulk = run(measure_bulk, a, args.model, batch, args.bulk)
    print(
        f"model {args.model}; c jobs in flight ({CLIENT_CONCURRENCY} per client), "
        f"{args.jobs} x 2 jobs and {args.seconds:g} s or more per row; "
        "+ = added to the direct call; x = ratio to the direct call; cpu ms = the CPU time "
        "node A (serving the model, the entry node), node B (forwarding to A) and the clients "
        "(this process) took per job"
    )
    print(table([("direct onnxruntime", 1, direct), *results], direct))
    for name, c, f in results:
        if f.failed:
            counts = {code: f.failed.count(code) for code in sorted(set(f.failed))}
            print(f"NOT ANSWERED: {name} at c={c}: {counts}")
    if bulk is not None:
        session = direct_session(args.model)
        started = time.perf_counter()
        session.run(None, {"input": batch})
        run_ms = (time.perf_counter() - started) * 1e3
        raw = bulk.raw_mb_per_s
        print(
            f"bulk: {args.bulk} x {batch.nbytes / 2**20:.1f} MiB requests ({rows} rows) through "
            f"one hop, after {bulk.warm_up} to warm up: {bulk.mb_per_s:.0f} MB/s; raw trio TCP "
            f"on loopback, a message beside each: {raw:.0f} MB/s; ratio "
            f"{bulk.mb_per_s / raw:.3f} (a direct run of that batch takes {run_ms:.1f} ms)"
        )
        print(
            f"bulk less the node's queue and run time: {bulk.moved_mb_per_s:.0f} MB/s; "
            f"ratio to raw TCP {bulk.moved_mb_per_s / raw:.3f}"
            + (
                ""
                if bulk.node_faults is None
                else f"; {bulk.node_faults:.0f} node page faults each"
            )
        )
    if plots:
        by_path = {"direct onnxruntime": direct.samples_ms}
        by_path.update({f"{name}, c=1": f.samples_ms for name, c, f in results if c == 1})
        figure = cdf(
            plots / "overhead_latency_cdf.png",
            by_path,
            xlabel="latency per job at concurrency 1 (ms, log scale)",
            title=f"bench.overhead: {args.model}, {args.jobs} jobs per path",
            log_x=True,
        )
        print(f"figure: {figure}")


if __name__ == "__main__":
    main()
