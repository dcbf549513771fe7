"""Chaos: real node processes under steady load, one killed, one stopped, the killed
one restarted; then a check of the whole history.

Usage: python -m bench.chaos [--nodes 4] [--rate 40] [--stop-s 10] [--history FILE]
                             [--plot DIR]
       python -m bench.chaos --short --json    (what the test suite runs)

Node processes are started with the CLI (`python -m p2p_node start`), every
bundled model served by two of them. Three clients (in this process) submit
one-row jobs at a steady total rate, each with every node's address and its own
entry node first, so a client whose node dies fails over. The timeline:

    t0            load starts
    t0 + 5 s      SIGSTOP node 1 (an entry node), a burst of jobs to it, then SIGKILL
    t0 + 8 s      SIGSTOP node 3 for `stop_s` seconds, then SIGCONT
    after that    restart node 1 on its data dir and port
    + 5 s         load stops; every job still out is awaited

Every job goes in the history (job id, entry node, submit and answer times,
outcome, executing peer, label). The checker then asks: did every job get
exactly one answer, all successful and equal to onnxruntime's own answer? Did
the restarted node keep its peer id and come back into every view? Was a node
that was never killed or stopped ever missing from a live node's view? How long
after the kill did the jobs in flight at the killed node get their answers? Did any
job wait longer than MAX_LATENCY_MS (the jobs held by the stopped node must be
answered elsewhere once it is reported departed, not at SIGCONT)?

`--plot DIR` also writes DIR/chaos_latency.png: every job's latency against the
time it was submitted, by the node that ran it, with the kill, stop, continue and
restart marked.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from bench._common import HELDOUT
from bench._plot import PLOT_HELP, plot_dir, timeline
from p2p_node import Client, JobError, bundled_models_dir

MODELS = [
    "digits-logreg",
    "digits-mlp",
    "digits-forest",
    "digits-svm",
    "cancer-logreg",
    "cancer-forest",
    "cancer-mlp",
]
CLIENTS = 3
# Models sit on nodes j % 4 and (j + 1) % 4: nodes 1 and 3 share none, so while
# one is dead and the other stopped, every model still has a live replica.
KILLED, STOPPED = 1, 3
# No job waits longer: not even one held by the stopped node, which the failure
# detector reports departed within its ttl (3 s), when its jobs are placed again.
MAX_LATENCY_MS = 4000.0


@dataclass(frozen=True)
class ChaosConfig:
    nodes: int = 4
    rate: float = 40.0  # jobs/s over all clients
    kill_at: float = 5.0
    stop_at: float = 8.0
    stop_s: float = 10.0
    settle_s: float = 5.0  # load after the restart
    burst: int = 30  # extra jobs sent to the node to be killed just before the kill
    job_timeout: float = 30.0
    seed: int = 0


SHORT = ChaosConfig(rate=20, stop_s=3.0, settle_s=3.0, burst=20)


@dataclass
class Job:
    job_id: str
    client: int
    entry: str  # the node the client sent it to first
    model: str
    row: int
    submitted: float
    answered: float | None = None
    outcome: str = "pending"
    answered_by: str | None = None  # the node that answered (after any failover)
    executor: str | None = None
    label: int | None = None
    answers: int = 0


@dataclass
class Report:
    jobs: list[Job]
    events: dict[str, float]
    peer_ids: list[str]
    restarted_peer_id: str
    missing_live: list[str] = field(default_factory=list)
    final_views: dict[str, list[str]] = field(default_factory=dict)


class NodeProcess:
    def __init__(self, index: int, data_dir: Path, port: int, serve: list[str]) -> None:
        self.index, self.data_dir, self.port, self.serve = index, data_dir, port, serve
        self.proc: subprocess.Popen[str] | None = None
        self.addr = ""

    def start(self, bootstrap: list[str]) -> str:
        args = [sys.executable, "-m", "p2p_node", "start", "--data-dir", str(self.data_dir)]
        args += ["--listen", f"/ip4/127.0.0.1/tcp/{self.port}", "--workers", "1"]
        for model in self.serve:
            args += ["--serve", model]
        for peer in bootstrap:
            args += ["--bootstrap", peer]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=60):
                raise RuntimeError(f"node {self.index} printed no address")
        self.addr = self.proc.stdout.readline().removeprefix("listening on ").strip()
        return self.addr

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/", 1)[1]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def placements(nodes: int) -> list[list[str]]:
    """Every model on two nodes, spread evenly."""
    serve: list[list[str]] = [[] for _ in range(nodes)]
    for j, model in enumerate(MODELS):
        serve[j % nodes].append(model)
        serve[(j + 1) % nodes].append(model)
    return serve


def heldout() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = bundled_models_dir() / "heldout"
    out = {}
    for name, file in HELDOUT.items():
        data = np.load(root / file)
        out[name] = (data["x"], data["y"])
    return out


def expected_labels(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """onnxruntime's own answer for every held-out row, per model."""
    out = {}
    for model in MODELS:
        session = ort.InferenceSession(str(bundled_models_dir() / model / "model.onnx"))
        x, _ = data[model.split("-")[0]]
        out[model] = session.run(None, {"input": x})[0]
    return out


async def run_chaos(config: ChaosConfig, root: Path) -> Report:
    ports = free_ports(config.nodes)
    serve = placements(config.nodes)
    nodes = [NodeProcess(i, root / f"node{i}", ports[i], serve[i]) for i in range(config.nodes)]
    try:
        first = nodes[0].start([])
        for node in nodes[1:]:
            node.start([first])
        addrs = [n.addr for n in nodes]
        await wait_for_full_views(addrs, set(range(config.nodes)))
        return await _drive(config, nodes)
    finally:
        for node in nodes:
            node.stop()


async def _drive(config: ChaosConfig, nodes: list[NodeProcess]) -> Report:
    data = heldout()
    rng = random.Random(config.seed)
    jobs: list[Job] = []
    events: dict[str, float] = {}
    peer_ids = [n.peer_id for n in nodes]
    missing: list[str] = []
    start = trio.current_time()
    load_done = trio.Event()

    async def client_loop(k: int, client: Client, entry: str) -> None:
        interval = CLIENTS / config.rate
        async with trio.open_nursery() as jobs_nursery:
            next_at = trio.current_time()
            while not load_done.is_set():
                model = rng.choice(MODELS)
                x, _ = data[model.split("-")[0]]
                row = rng.randrange(len(x))
                job = Job(f"{k}-{len(jobs)}", k, entry, model, row, trio.current_time() - start)
                jobs.append(job)
                jobs_nursery.start_soon(one_job, client, job, x[row : row + 1])
                next_at += interval
                await trio.sleep_until(next_at)

    async def one_job(client: Client, job: Job, row: np.ndarray) -> None:
        try:
            result = await client.submit(
                job.model, {"input": row}, job_id=job.job_id, timeout=config.job_timeout
            )
        except JobError as error:
            job.outcome = error.code.name
        else:
            job.outcome = "ok"
            job.executor = result.executor
            job.label = int(result.outputs["label"][0])
        job.answered = trio.current_time() - start
        job.answers += 1
        job.answered_by = client.peer_id

    async def burst(client: Client, k: int) -> None:
        """Jobs in flight at the killed node when it dies: what failover is about."""
        async with trio.open_nursery() as nursery:
            for b in range(config.burst):
                model = MODELS[b % len(MODELS)]
                x, _ = data[model.split("-")[0]]
                row = rng.randrange(len(x))
                job = Job(
                    f"{k}-burst-{b}", k, client.peer_id, model, row, trio.current_time() - start
                )
                jobs.append(job)
                nursery.start_soon(one_job, client, job, x[row : row + 1])

    async def chaos() -> None:
        await trio.sleep_until(start + config.kill_at)
        killed_entry = [c for c, entry in clients if entry == nodes[KILLED].peer_id]
        # Stopped first, the node cannot answer the burst: every job of it is in
        # flight at the kill, however fast the node would have been. (Sent to a
        # running node 20 ms before the kill, most of it was answered in time.)
        nodes[KILLED].signal(signal.SIGSTOP)
        async with trio.open_nursery() as bursts:
            for k, client in enumerate(killed_entry):
                bursts.start_soon(burst, client, k)
            await trio.sleep(0.02)  # the burst is on its way: kill with it in flight
            nodes[KILLED].signal(signal.SIGKILL)
            events["kill"] = trio.current_time() - start
        await trio.sleep_until(start + config.stop_at)
        nodes[STOPPED].signal(signal.SIGSTOP)
        events["stop"] = trio.current_time() - start
        await trio.sleep(config.stop_s)
        nodes[STOPPED].signal(signal.SIGCONT)
        events["cont"] = trio.current_time() - start
        live = [n.addr for n in nodes if n.index != KILLED]
        await trio.to_thread.run_sync(nodes[KILLED].start, live[:1])
        events["restart"] = trio.current_time() - start
        await trio.sleep(config.settle_s)
        load_done.set()
        events["load_end"] = trio.current_time() - start

    async def watch_views() -> None:
        """Sample every live node's view; a never-disturbed node must always be there."""
        steady = [i for i in range(len(nodes)) if i not in (KILLED, STOPPED)]
        while not load_done.is_set():
            for i in steady:
                try:
                    with trio.fail_after(2):
                        async with Client.connect(nodes[i].addr) as c:
                            seen = {r.record.peer_id for r in await c.peers()}
                except (JobError, trio.TooSlowError):
                    continue
                for j in steady:
                    if j != i and nodes[j].peer_id not in seen:
                        missing.append(
                            f"t={trio.current_time() - start:.1f}s: node {i} lost node {j}"
                        )
            await trio.sleep(0.5)

    clients: list[tuple[Client, str]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chaos)
        nursery.start_soon(watch_views)
        async with trio.open_nursery() as holders:
            for k in range(CLIENTS):
                entry = k % len(nodes)
                order = [nodes[(entry + d) % len(nodes)].addr for d in range(len(nodes))]
                clients.append((await _open_client(holders, order), nodes[entry].peer_id))
            async with trio.open_nursery() as load:
                for k, (client, entry_peer) in enumerate(clients):
                    load.start_soon(client_loop, k, client, entry_peer)
            holders.cancel_scope.cancel()
    restarted = nodes[KILLED].peer_id
    await wait_for_full_views([n.addr for n in nodes], set(range(len(nodes))))
    final = {}
    for node in nodes:
        async with Client.connect(node.addr) as c:
            final[node.peer_id] = sorted(
                r.record.peer_id for r in await c.peers() if r.state == "alive"
            )
    return Report(jobs, events, peer_ids, restarted, missing, final)


async def _open_client(nursery: trio.Nursery, addrs: list[str]) -> Client:
    """A Client that stays connected until `nursery` ends."""
    ready: list[Client] = []
    opened = trio.Event()

    async def hold(task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        async with Client.connect(addrs) as client:
            ready.append(client)
            opened.set()
            await trio.sleep_forever()

    nursery.start_soon(hold)
    await opened.wait()
    return ready[0]


async def wait_for_full_views(addrs: list[str], expected: set[int], timeout: float = 60) -> None:
    want = {a.rsplit("/", 1)[1] for a in addrs}
    with trio.fail_after(timeout):
        for addr in addrs:
            me = addr.rsplit("/", 1)[1]
            while True:
                try:
                    async with Client.connect(addr) as c:
                        alive = {r.record.peer_id for r in await c.peers() if r.state == "alive"}
                    if alive >= want - {me}:
                        break
                except JobError:
                    pass
                await trio.sleep(0.2)


@dataclass(frozen=True)
class Verdict:
    submitted: int
    answered_once: int
    lost: int
    duplicated: int
    failed: dict[str, int]
    wrong: int
    kept_peer_id: bool
    back_in_every_view: bool
    live_declared_dead: int
    failover_ms: list[float]
    max_latency_ms: float

    @property
    def failover_p99_ms(self) -> float:
        if not self.failover_ms:
            return 0.0
        ordered = sorted(self.failover_ms)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and not self.failed
            and self.wrong == 0
            and self.kept_peer_id
            and self.back_in_every_view
            and self.live_declared_dead == 0
            and self.failover_p99_ms <= 1000
            and self.max_latency_ms <= MAX_LATENCY_MS
        )


def check(report: Report, original_peer_id: str) -> Verdict:
    """The history checker."""
    expected = expected_labels(heldout())
    counts = Counter(job.job_id for job in report.jobs)
    lost = sum(1 for job in report.jobs if job.answers == 0)
    duplicated = sum(1 for job in report.jobs if job.answers > 1) + sum(
        n - 1 for n in counts.values() if n > 1
    )
    failed = Counter(job.outcome for job in report.jobs if job.outcome not in ("ok", "pending"))
    wrong = sum(
        1
        for job in report.jobs
        if job.outcome == "ok" and job.label != int(expected[job.model][job.row])
    )
    kill = report.events["kill"]
    killed = original_peer_id
    in_flight_at_kill = [
        job
        for job in report.jobs
        if job.entry == killed
        and job.submitted <= kill
        and job.answered is not None
        and job.answered > kill
    ]
    everyone = set(report.peer_ids)
    back = all(set(alive) >= everyone - {me} for me, alive in report.final_views.items())
    return Verdict(
        submitted=len(report.jobs),
        answered_once=sum(1 for job in report.jobs if job.answers == 1),
        lost=lost,
        duplicated=duplicated,
        failed=dict(failed),
        wrong=wrong,
        kept_peer_id=report.restarted_peer_id == original_peer_id,
        back_in_every_view=back,
        live_declared_dead=len(report.missing_live),
        failover_ms=[(job.answered - kill) * 1e3 for job in in_flight_at_kill],  # type: ignore[operator]
        max_latency_ms=max(
            ((j.answered - j.submitted) * 1e3 for j in report.jobs if j.answered is not None),
            default=0.0,
        ),
    )


def print_verdict(report: Report, verdict: Verdict) -> None:
    events = ", ".join(f"{name} {t:.1f}s" for name, t in report.events.items())
    latencies = [(j.answered - j.submitted) * 1e3 for j in report.jobs if j.answered is not None]
    by_entry = Counter(j.answered_by[-6:] for j in report.jobs if j.answered_by)
    print(f"timeline: {events}")
    print(
        f"jobs: {verdict.submitted} submitted, {verdict.answered_once} answered once, "
        f"{verdict.lost} lost, {verdict.duplicated} duplicated, failed {verdict.failed or 0}, "
        f"{verdict.wrong} wrong answers"
    )
    if latencies:
        ordered = sorted(latencies)
        print(
            f"job latency: p50 {statistics.median(ordered):.1f} ms, "
            f"p99 {ordered[round(0.99 * (len(ordered) - 1))]:.1f} ms, max {ordered[-1]:.0f} ms "
            f"(at most {MAX_LATENCY_MS:.0f} ms)"
        )
    print(f"answered by node (last 6 of peer id): {dict(by_entry)}")
    print(
        f"failover after SIGKILL: {len(verdict.failover_ms)} jobs in flight at the killed "
        f"node, answered p99 {verdict.failover_p99_ms:.0f} ms after the kill"
        + (f" (max {max(verdict.failover_ms):.0f} ms)" if verdict.failover_ms else "")
    )
    print(
        f"restarted node kept its peer id: {verdict.kept_peer_id}; back in every view: "
        f"{verdict.back_in_every_view}"
    )
    print(f"live peers missing from a live view: {verdict.live_declared_dead}")
    for line in report.missing_live[:5]:
        print(f"  {line}")
    print(f"verdict: {'PASS' if verdict.ok else 'FAIL'}")


def plot_latency(report: Report, config: ChaosConfig, directory: Path) -> Path:
    """Each answered job at (submitted, latency), grouped by the node that ran it."""
    names = {peer: f"node {i}" for i, peer in enumerate(report.peer_ids)}
    names[report.peer_ids[KILLED]] += " (killed, restarted)"
    names[report.peer_ids[STOPPED]] += " (stopped)"
    points: dict[str, tuple[list[float], list[float]]] = {}
    for job in report.jobs:
        if job.answered is None:
            continue
        if job.outcome == "ok" and job.executor is not None:
            group = "ran on " + names.get(job.executor, job.executor[-6:])
        else:
            group = f"failed: {job.outcome}"
        ts, ms = points.setdefault(group, ([], []))
        ts.append(job.submitted)
        ms.append((job.answered - job.submitted) * 1e3)
    return timeline(
        directory / "chaos_latency.png",
        dict(sorted(points.items())),
        {k: v for k, v in report.events.items() if k != "load_end"},
        xlabel="job submitted at (s after load start)",
        ylabel="job latency (ms, submit to answer)",
        title=f"bench.chaos: {config.nodes} nodes, {config.rate:g} jobs/s, "
        f"node {STOPPED} stopped {config.stop_s:g} s",
    )


async def main_async(args: argparse.Namespace) -> int:
    # A client's failed dials to the dead node are expected here; libp2p logs each.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if args.short:
        config = SHORT
    else:
        config = ChaosConfig(nodes=args.nodes, rate=args.rate, stop_s=args.stop_s)
    with tempfile.TemporaryDirectory(prefix="p2p-chaos-") as tmp:
        started = time.monotonic()
        report = await run_chaos(config, Path(tmp))
        original = report.peer_ids[KILLED]
        verdict = check(report, original)
        print(f"{config} ran {time.monotonic() - started:.0f} s")
        print_verdict(report, verdict)
        if args.plot:
            print(f"figure: {plot_latency(report, config, args.plot)}")
        if args.json:
            summary = asdict(verdict) | {
                "ok": verdict.ok,
                "failover_p99_ms": verdict.failover_p99_ms,
                "missing_live": report.missing_live,
            }
            print(json.dumps(summary))
        if args.history:
            lines = "".join(json.dumps(asdict(job)) + "\n" for job in report.jobs)
            await trio.Path(args.history).write_text(lines)
    return 0 if verdict.ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--stop-s", type=float, default=10.0)
    parser.add_argument("--history", type=Path, help="write the history here, one JSON per job")
    parser.add_argument("--short", action="store_true", help="the test suite's short run")
    parser.add_argument("--json", action="store_true", help="end with the verdict as JSON")
    parser.add_argument("--plot", type=Path, metavar="DIR", help=PLOT_HELP)
    args = parser.parse_args()
    args.plot = plot_dir(args.plot)
    sys.exit(trio.run(main_async, args))


if __name__ == "__main__":
    main()
