"""Placement strategies: decision time, and tail latency under stale views (simulated).

Usage: python -m bench.scheduler [--requests 100000] [--seed 1] [--quick] [--skip-real]
                                 [--jobs N] [--plot DIR]

1. Decision time. N NodeInfo (N = 100, 1,000, 10,000), every one serving the model,
   random loads; one NodeIndex over them; a CoordinatorSnapshot with outstanding
   counts and observed latencies for a tenth of them. Per DistributionStrategy:
   microseconds per `shortlist(...)` (what the orchestrator computes for each job)
   and per `place(...)` (the full ranking `p2p-node place` prints), median of
   several repetitions of many calls each (time.perf_counter).

2. Simulation, in virtual time (one heap of completions, no sleeps, no trio). K
   coordinators receive one Poisson stream of requests (each request goes to a
   uniformly drawn coordinator) and place each one with our real `shortlist`,
   `pick` or `place` over a NodeIndex of P peers. A peer is a FIFO single server with exponential
   service: half the peers are fast (mean 10 ms), half slow (mean 40 ms), so the
   total capacity is P/2 x (100 + 25) requests/s and load = arrival rate / capacity.
   Every request carries one unit exponential of work, drawn once per load, so
   every strategy sees the same arrivals and the same work (common random numbers):
   its service time is that work x the mean of the peer it lands on.

   Views: every 50 ms of virtual time each peer's queue is snapshot (in_flight 1
   if busy, queue_length waiting); at time t every coordinator reads the snapshot
   taken at or before t - staleness (one NodeIndex per snapshot, shared, built once
   when first read; staleness 0 reads the latest snapshot, up to 50 ms old). A
   record arrives within milliseconds of being issued and then ages until the next
   one, so a view's `as_of` (its receive time, which a report must beat) is the
   snapshot's time: staleness is the view's age when read, not a delivery delay. A
   view also carries the peer's mean service time as gossiped latency (a prior
   until the coordinator has observed the peer itself), and cpu_count 8 for a fast
   peer and 2 for a slow one (CAPABILITY_BASED's capacity).

   Each coordinator knows its own outstanding requests per peer exactly: a PeerStats
   each, updated with placed/sent at the send and done/succeeded(latency) at the
   completion, so LATENCY_OPTIMIZED learns peak-EWMA latencies. Every answer reports
   the peer's load at that moment (`reported`), as a real executor's reply does.

   Probes: every strategy but ROUND_ROBIN runs as the orchestrator runs it.
   When `to_probe` says it pays (a queue at the first candidate, and requests heavier
   than a probe: every answer reports its service time), the coordinator learns the
   exact load of its first PROBED (2) candidates and `settle`s them (by expected
   completion, or by MODEL_SPECIFIC's and CAPABILITY_BASED's own score). The
   request's latency then includes the probe's round trip, PROBE_RTT_S: 2.5 ms, a
   little above the p50 a probe takes between two node processes here (section 3
   measures it). The queue is read when the probe is sent: the round trip delays
   the request, but it joins the queue the probe saw.

   Compared: every DistributionStrategy; LEAST_LOADED also without two random choices
   (no-p2c: `place(..., power_of_two=False)`), without probes, and without both;
   LATENCY_OPTIMIZED without probes; RANDOM (a uniform peer) and an ORACLE that sees
   every queue exactly now and takes the peer with the least (queue + 1) x mean
   service. Figures: mean and p99 of latency (queue + service) as ratios to the
   oracle's at the same load. The first 5% of requests of a run (beyond --requests)
   are warm-up and not counted. Policies that read no queue lengths from the view
   (ORACLE, RANDOM, ROUND_ROBIN, LATENCY_OPTIMIZED no probes: it reads only the
   gossiped latency, which is constant here) run once per load. Points run in --jobs
   worker processes (default: one per core).

   Straggler: at 80% load and 1 s stale views, one fast peer serves 10x slower
   for the middle 30% of the run (requests that start service in that window).
   Figures: the fraction of requests done within 1 s, overall and for those
   arriving in the window, and p99.

3. Real node processes on this machine (bench/real.py): throughput and p99 per strategy
   through one coordinator, and a batch job over 1 node vs 2 (--skip-real skips it).

`--plot DIR` also writes DIR/scheduler.png: p99 against the views' staleness at 80%
load, per strategy as the orchestrator runs it (ROUND_ROBIN, off the scale, aside)
and for the oracle.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from types import MappingProxyType

import numpy as np

from scheduler import (
    CoordinatorSnapshot,
    DistributionStrategy,
    NodeIndex,
    NodeInfo,
    OrchestratorConfig,
    PeerStats,
    pick,
    place,
    settle,
    shortlist,
    to_probe,
)

MODEL = "model-a"
OTHER_MODELS = ("model-b", "model-c")

DECISION_SIZES = (100, 1_000, 10_000)
DECISION_REPS = 7
DECISION_TARGET_S = 0.05  # wall time of one repetition, roughly
PICK_TARGET_US = 50.0  # acceptance: LEAST_LOADED's decision per job at 1,000 peers

PEERS = 8
COORDINATORS = 4
FAST_MEAN_S = 0.010
SLOW_MEAN_S = 0.040
SNAPSHOT_S = 0.050
WARM_UP = 0.05  # extra requests simulated before counting, as a fraction of --requests
LOADS = (0.5, 0.8, 0.95)
STALENESS = (0.0, 1.0, 5.0, 10.0)
QUICK_LOADS = (0.8,)
QUICK_STALENESS = (1.0, 5.0)
MAIN_POINT = (0.8, 1.0)
STRAGGLER_SLOWDOWN = 10.0
STRAGGLER_SPAN = (0.35, 0.65)  # of the run's virtual duration
TIMEOUT_S = 1.0
SHORTLIST = OrchestratorConfig().shortlist
PROBE_RTT_S = 0.0025  # what a probe adds to a request's latency (see the docstring)

DS = DistributionStrategy


@dataclass(frozen=True)
class Policy:
    name: str
    strategy: DistributionStrategy | None  # None: not our strategy code (RANDOM, ORACLE)
    power_of_two: bool = True
    reads_load: bool = True  # reads queue lengths from the view (False: staleness is moot)
    probe: bool = False  # asks its first PROBED candidates for their load before sending


POLICIES = (
    Policy("ORACLE", None, reads_load=False),
    Policy("RANDOM", None, reads_load=False),
    Policy("ROUND_ROBIN", DS.ROUND_ROBIN, reads_load=False),
    # LEAST_LOADED and LATENCY_OPTIMIZED as the orchestrator runs them: with probes.
    Policy("LEAST_LOADED", DS.LEAST_LOADED, probe=True),
    Policy("LEAST_LOADED no-p2c", DS.LEAST_LOADED, power_of_two=False, probe=True),
    Policy("LEAST_LOADED no probes", DS.LEAST_LOADED),
    Policy("LEAST_LOADED no-p2c no probes", DS.LEAST_LOADED, power_of_two=False),
    Policy("MODEL_SPECIFIC", DS.MODEL_SPECIFIC, probe=True),
    Policy("CAPABILITY_BASED", DS.CAPABILITY_BASED, probe=True),
    Policy("LATENCY_OPTIMIZED", DS.LATENCY_OPTIMIZED, probe=True),
    # Without probes, LATENCY_OPTIMIZED reads from the view only the gossiped latency,
    # its prior for a peer not yet observed, and that stays the mean service time here
    # (no straggler). With 8 peers it ranks them all: no two random choices.
    Policy("LATENCY_OPTIMIZED no probes", DS.LATENCY_OPTIMIZED, reads_load=False),
)
BY_NAME = {p.name: p for p in POLICIES}


def percentile(samples: np.ndarray, q: float) -> float:
    return float(np.quantile(samples, q / 100))


# --- 1. decision time ---------------------------------------------------------------


def decision_view(n: int, rng: random.Random) -> tuple[NodeIndex, CoordinatorSnapshot]:
    nodes = []
    for i in range(n):
        loaded = {MODEL} | {m for m in OTHER_MODELS if rng.random() < 0.5}
        nodes.append(
            NodeInfo(
                peer_id=f"peer-{i:05d}",
                models_loaded=frozenset(loaded),
                in_flight=rng.randint(0, 4),
                queue_length=rng.randint(0, 20),
                cpu_percent=rng.uniform(0, 100),
                cpu_count=rng.choice((2, 4, 8, 16)),
                memory_mb=16_384,
                memory_available_mb=rng.randint(1_000, 16_000),
                gpu_count=rng.choice((0, 0, 0, 1)),
                latency_ms=MappingProxyType({MODEL: rng.uniform(5, 50)}),
            )
        )
    known = rng.sample(nodes, max(1, n // 10))
    state = CoordinatorSnapshot(
        outstanding_by_peer={node.peer_id: rng.randint(0, 3) for node in known},
        latency_by_peer_model={(node.peer_id, MODEL): rng.uniform(5, 50) for node in known},
        turns_by_model={MODEL: 12_345},
    )
    return NodeIndex(nodes), state


def time_per_call_us(call: Callable[[], object]) -> float:
    """Median over repetitions of the mean time per call, in microseconds."""
    started = time.perf_counter()
    call()
    once = max(time.perf_counter() - started, 1e-7)
    calls = max(1, min(200_000, int(DECISION_TARGET_S / once)))
    reps = []
    for _ in range(DECISION_REPS):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        reps.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(reps)


def decision_rows() -> list[tuple[str, bool]]:
    """(label, power_of_two) rows of the decision-time table."""
    rows = [(s.name, True) for s in DS]
    rows.insert(2, ("LEAST_LOADED no-p2c", False))
    rows.append(("LATENCY_OPTIMIZED no-p2c", False))
    return rows


def run_decision_time(sizes: Sequence[int], seed: int) -> float:
    """Print the decision-time table; return LEAST_LOADED's per-job time at 1,000 peers."""
    print(f"== 1. Decision time per job (us per call, median of {DECISION_REPS} repetitions) ==")
    head = f"{'strategy':<27}" + "".join(f"{f'per job {n}':>15}{f'place {n}':>14}" for n in sizes)
    print(head)
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for n in sizes:
        index, state = decision_view(n, random.Random(seed + n))
        for label, p2c in decision_rows():
            strategy = DistributionStrategy[label.split()[0]]
            rng = random.Random(seed)
            now = 1_000.0
            per_job = partial(
                shortlist, strategy, MODEL, index, state, now=now, rng=rng, size=SHORTLIST
            )
            do_place = partial(
                place, strategy, MODEL, index, state, now=now, rng=rng, power_of_two=p2c
            )
            job_us = time_per_call_us(per_job) if p2c else math.nan
            results[label, n] = (job_us, time_per_call_us(do_place))
    for label, _ in decision_rows():
        cells = []
        for n in sizes:
            job_us, place_us = results[label, n]
            job_cell = "-" if math.isnan(job_us) else f"{job_us:.1f}"
            cells.append(f"{job_cell:>15}{place_us:>14.1f}")
        print(f"{label:<27}" + "".join(cells))
    print(
        f"(per job: the orchestrator's shortlist of {SHORTLIST}, drawn at random over more "
        "than 16 candidates for LEAST_LOADED, more than 64 for LATENCY_OPTIMIZED, a full "
        "ranking otherwise; place: the full ranking `p2p-node place` prints; 'no-p2c' is "
        "place(power_of_two=False))"
    )
    return results.get(("LEAST_LOADED", 1_000), (math.nan, math.nan))[0]


# --- 2. simulation ------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One load's arrivals and work, shared by every policy (common random numbers)."""

    load: float
    rate: float
    arrivals: list[float]
    coordinators: list[int]
    work: list[float]  # unit exponentials
    counted_from: int  # requests before this index are warm-up
    duration: float


def peer_means() -> list[float]:
    # Alternate fast and slow so that peer id order (tie-breaks) favours neither.
    return [FAST_MEAN_S if i % 2 == 0 else SLOW_MEAN_S for i in range(PEERS)]


def capacity() -> float:
    return sum(1.0 / m for m in peer_means())


@lru_cache(maxsize=4)
def make_workload(load: float, requests: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, round(load * 1000)])
    warm = int(requests * WARM_UP)
    total = requests + warm
    rate = load * capacity()
    arrivals = np.cumsum(rng.exponential(1.0 / rate, total))
    return Workload(
        load=load,
        rate=rate,
        arrivals=arrivals.tolist(),
        coordinators=rng.integers(0, COORDINATORS, total).tolist(),
        work=rng.exponential(1.0, total).tolist(),
        counted_from=warm,
        duration=float(arrivals[-1]),
    )


@dataclass(frozen=True)
class Straggler:
    peer: int
    start: float
    end: float
    slowdown: float


@dataclass
class Outcome:
    latencies: np.ndarray  # counted requests only, seconds
    arrivals: np.ndarray
    wall_s: float

    @property
    def mean(self) -> float:
        return float(self.latencies.mean())

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


def simulate(
    workload: Workload,
    policy: Policy,
    staleness: float,
    seed: int,
    straggler: Straggler | None = None,
) -> Outcome:
    started_wall = time.perf_counter()
    means = peer_means()
    peer_ids = [f"peer-{i:02d}" for i in range(PEERS)]
    slot = {pid: i for i, pid in enumerate(peer_ids)}
    cpu = [8 if m == FAST_MEAN_S else 2 for m in means]

    def mean_at(p: int, t: float) -> float:
        if straggler and p == straggler.peer and straggler.start <= t < straggler.end:
            return means[p] * straggler.slowdown
        return means[p]

    in_system = [0] * PEERS  # requests at the peer, the one in service included
    busy_until = [0.0] * PEERS
    snapshots: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
    indexes: dict[int, NodeIndex] = {}
    next_tick = 0.0

    def view_at(t: float) -> NodeIndex:
        k = min(len(snapshots) - 1, max(0, math.floor((t - staleness) / SNAPSHOT_S + 1e-9)))
        index = indexes.get(k)
        if index is None:
            counts, gossiped = snapshots[k]
            index = NodeIndex(
                [
                    NodeInfo(
                        peer_id=peer_ids[p],
                        models_loaded=frozenset({MODEL}),
                        in_flight=min(1, counts[p]),
                        queue_length=max(0, counts[p] - 1),
                        cpu_count=cpu[p],
                        memory_mb=8_192,
                        memory_available_mb=4_096,
                        latency_ms=MappingProxyType({MODEL: gossiped[p] * 1e3}),
                        as_of=k * SNAPSHOT_S,
                    )
                    for p in range(PEERS)
                ]
            )
            indexes[k] = index
            indexes.pop(k - 2, None)  # views only move forward
        return index

    stats = [PeerStats() for _ in range(COORDINATORS)]
    rngs = [random.Random(seed * 7919 + c) for c in range(COORDINATORS)]
    strategy = policy.strategy
    p2c = policy.power_of_two
    use_stats = strategy is not None
    # finish, seq, coordinator, peer, latency, service
    completions: list[tuple[float, int, int, int, float, float]] = []
    n = len(workload.arrivals)
    latencies = [0.0] * n
    arrivals, coords, works = workload.arrivals, workload.coordinators, workload.work
    heappush, heappop = heapq.heappush, heapq.heappop

    for i in range(n):
        t = arrivals[i]
        # Advance virtual time to t: completions and snapshot ticks, in time order.
        while True:
            due = completions[0][0] if completions else math.inf
            if next_tick <= t and next_tick <= due:
                snapshots.append(
                    (tuple(in_system), tuple(mean_at(p, next_tick) for p in range(PEERS)))
                )
                next_tick += SNAPSHOT_S
            elif due <= t:
                finish, _, c, p, lat, service = heappop(completions)
                in_system[p] -= 1
                if use_stats:
                    st = stats[c]
                    st.done(peer_ids[p])
                    st.succeeded(peer_ids[p], MODEL, lat * 1e3, finish, service * 1e3)
                    st.reported(peer_ids[p], in_system[p], finish)
            else:
                break
        c = coords[i]
        extra = 0.0
        if strategy is None:
            if policy.name == "RANDOM":
                p = rngs[c].randrange(PEERS)
            else:  # ORACLE: the least expected completion, from exact queues now
                p = min(range(PEERS), key=lambda q: (in_system[q] + 1) * mean_at(q, t))
        else:
            index = view_at(t)
            st = stats[c]
            if policy.probe:  # as DistributedModelOrchestrator places
                if p2c:
                    ranked = shortlist(
                        strategy, MODEL, index, st, now=t, rng=rngs[c], size=SHORTLIST
                    )
                else:
                    ranked = place(
                        strategy, MODEL, index, st, now=t, rng=rngs[c], power_of_two=False
                    )
                asked = to_probe(ranked, index, st, PROBE_RTT_S * 1e3)
                for pid in asked:
                    st.reported(pid, in_system[slot[pid]], t)
                if asked:
                    ranked = settle(ranked, index, st, asked, strategy=strategy)
                    extra = PROBE_RTT_S
                chosen = ranked.candidates[0] if ranked.candidates else None
            elif p2c:
                chosen = pick(strategy, MODEL, index, st, now=t, rng=rngs[c])
            else:
                ranked = place(strategy, MODEL, index, st, now=t, rng=rngs[c], power_of_two=False)
                chosen = ranked.candidates[0] if ranked.candidates else None
            if chosen is None:
                raise RuntimeError(f"{policy.name} placed nothing at t={t:.3f}")
            p = slot[chosen.peer_id]
            st.placed(MODEL)
            st.sent(chosen.peer_id)
        begin = busy_until[p] if busy_until[p] > t else t
        service = works[i] * mean_at(p, begin)
        finish = begin + service
        busy_until[p] = finish
        in_system[p] += 1
        lat = finish - t  # from the send: what the coordinator's own clock measures
        latencies[i] = lat + extra  # from the request's arrival, its probe included
        heappush(completions, (finish, i, c, p, lat, service))

    k = workload.counted_from
    return Outcome(
        latencies=np.array(latencies[k:]),
        arrivals=np.array(arrivals[k:]),
        wall_s=time.perf_counter() - started_wall,
    )


Task = tuple[
    float, float, str, int, int, bool
]  # load, staleness, policy, requests, seed, straggler


def run_task(task: Task) -> Outcome:
    """One simulation point (runs in a worker process; the workload is rebuilt there)."""
    load, stale, name, requests, seed, with_straggler = task
    workload = make_workload(load, requests, seed)
    straggler = straggler_for(workload) if with_straggler else None
    return simulate(workload, BY_NAME[name], stale, seed, straggler)


def run_tasks(tasks: Sequence[Task], jobs: int) -> list[Outcome]:
    if jobs <= 1:
        return [run_task(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run_task, tasks))


def run_grid(
    loads: Sequence[float], staleness: Sequence[float], requests: int, seed: int, jobs: int
) -> dict[tuple[float, float, str], Outcome]:
    tasks: list[Task] = []
    keys: list[list[tuple[float, float, str]]] = []
    for load in loads:
        for policy in POLICIES:
            if policy.reads_load:
                for stale in staleness:
                    tasks.append((load, stale, policy.name, requests, seed, False))
                    keys.append([(load, stale, policy.name)])
            else:
                tasks.append((load, staleness[0], policy.name, requests, seed, False))
                keys.append([(load, stale, policy.name) for stale in staleness])
    results: dict[tuple[float, float, str], Outcome] = {}
    for outcome, names in zip(run_tasks(tasks, jobs), keys, strict=True):
        for key in names:
            results[key] = outcome
    return results


P2C_SEEDS = 3  # the p2c comparison pools this many seeds: its margin is small


def _pooled(outcomes: Sequence[Outcome]) -> Outcome:
    return Outcome(
        latencies=np.concatenate([o.latencies for o in outcomes]),
        arrivals=np.concatenate([o.arrivals for o in outcomes]),
        wall_s=sum(o.wall_s for o in outcomes),
    )


def run_p2c_seeds(
    grid: dict[tuple[float, float, str], Outcome],
    staleness: Sequence[float],
    requests: int,
    seed: int,
    jobs: int,
) -> dict[tuple[float, str], list[Outcome]]:
    """LEAST_LOADED with and without p2c at 80% load and views 5 s stale or more, over
    P2C_SEEDS seeds (the grid's and the next ones): with probes, what p2c keeps over
    no-p2c is a few percent, near the noise of one seed's p99."""
    load = MAIN_POINT[0]
    names = ("LEAST_LOADED", "LEAST_LOADED no-p2c")
    points = [(s, name) for s in staleness for name in names if s >= 5 and (load, s, name) in grid]
    tasks: list[Task] = [
        (load, s, name, requests, seed + k, False)
        for k in range(1, P2C_SEEDS)
        for s, name in points
    ]
    runs: dict[tuple[float, str], list[Outcome]] = {
        (s, name): [grid[load, s, name]] for s, name in points
    }
    for task, outcome in zip(tasks, run_tasks(tasks, jobs), strict=True):
        runs[task[1], task[2]].append(outcome)
    return runs


def print_grid(
    results: dict[tuple[float, float, str], Outcome],
    loads: Sequence[float],
    staleness: Sequence[float],
    requests: int,
) -> None:
    for load in loads:
        oracle = results[load, staleness[0], "ORACLE"]
        print(
            f"\n-- load {load:.0%}: {load * capacity():.0f} req/s over {PEERS} peers "
            f"({PEERS // 2} x {FAST_MEAN_S * 1e3:g} ms, {PEERS // 2} x {SLOW_MEAN_S * 1e3:g} ms), "
            f"{COORDINATORS} coordinators, {requests} requests counted; "
            f"ORACLE mean {oracle.mean * 1e3:.1f} ms, p99 {oracle.p99 * 1e3:.1f} ms --"
        )
        print(
            f"{'strategy / staleness':<27}"
            + "".join(f"{f'{s:g}s mean':>11}{'p99':>8}" for s in staleness)
            + f"{'wall':>8}"
        )
        for policy in POLICIES:
            cells = []
            wall = 0.0
            seen: set[int] = set()
            for stale in staleness:
                out = results[load, stale, policy.name]
                cells.append(f"{out.mean / oracle.mean:>11.2f}{out.p99 / oracle.p99:>8.2f}")
                if id(out) not in seen:
                    wall += out.wall_s
                    seen.add(id(out))
            note = "" if policy.reads_load else " *"
            print(f"{policy.name + note:<27}" + "".join(cells) + f"{wall:>7.1f}s")
    half = PEERS // 2
    floor = (half * (half - 1)) / (PEERS * (PEERS - 1))
    slow_share = (half / SLOW_MEAN_S) / capacity()
    for line in (
        "ratios to ORACLE at the same load. * reads no queue lengths from the view: run "
        "once per load, the same figures repeat across staleness.",
        f"RANDOM and ROUND_ROBIN send half the requests to the slow half, which has "
        f"{slow_share:.0%} of the capacity: above {2 * slow_share:.0%} load their queues grow "
        "without bound and their figures grow with the run's length.",
        f"Two random choices (p2c) out of {PEERS}: both are slow peers in {floor:.1%} of "
        f"picks, whatever the scores, so at least that share goes to the slow half "
        f"({slow_share:.0%} of capacity); no-p2c ranks all {PEERS}.",
        "MODEL_SPECIFIC and CAPABILITY_BASED rank like LEAST_LOADED no-p2c here: every peer "
        "has the model loaded, and CPUs (capacity) are in proportion to speed.",
        f"A probe adds {PROBE_RTT_S * 1e3:g} ms to the latency of each request it precedes.",
    ):
        print(f"note: {line}")


def straggler_for(workload: Workload) -> Straggler:
    span = workload.duration
    return Straggler(
        peer=0,  # a fast peer
        start=STRAGGLER_SPAN[0] * span,
        end=STRAGGLER_SPAN[1] * span,
        slowdown=STRAGGLER_SLOWDOWN,
    )


def run_straggler(requests: int, seed: int, jobs: int) -> dict[str, Outcome]:
    load, stale = MAIN_POINT
    workload = make_workload(load, requests, seed)
    span = workload.duration
    straggler = straggler_for(workload)
    print(
        f"\n-- straggler: load {load:.0%}, views {stale:g} s stale; peer-00 (fast, "
        f"{FAST_MEAN_S * 1e3:g} ms) serves {STRAGGLER_SLOWDOWN:g}x slower from "
        f"t={straggler.start:.0f} s to t={straggler.end:.0f} s of {span:.0f} s; "
        f"{requests} requests counted --"
    )
    print(
        f"{'strategy':<27}{'<=1s all':>10}{'<=1s window':>13}{'mean ms':>10}"
        f"{'p99 ms':>10}{'p99.9 ms':>10}{'p99/oracle':>12}{'wall':>8}"
    )
    tasks = [(load, stale, policy.name, requests, seed, True) for policy in POLICIES]
    results = dict(zip(BY_NAME, run_tasks(tasks, jobs), strict=True))
    oracle = results["ORACLE"]
    for policy in POLICIES:
        out = results[policy.name]
        lat, arr = out.latencies, out.arrivals
        window = (arr >= straggler.start) & (arr < straggler.end)
        within = float(np.mean(lat <= TIMEOUT_S))
        within_window = float(np.mean(lat[window] <= TIMEOUT_S))
        print(
            f"{policy.name:<27}{within:>10.4%}{within_window:>13.4%}{out.mean * 1e3:>10.1f}"
            f"{out.p99 * 1e3:>10.1f}{percentile(lat, 99.9) * 1e3:>10.1f}"
            f"{out.p99 / oracle.p99:>12.2f}{out.wall_s:>7.1f}s"
        )
    return results


# ROUND_ROBIN's queues grow without bound at 80% load (see the notes): off the scale.
PLOTTED = ("ORACLE", *(s.name for s in DS if s is not DS.ROUND_ROBIN))


def plot_staleness(
    grid: dict[tuple[float, float, str], Outcome],
    staleness: Sequence[float],
    directory: Path,
) -> Path | None:
    """DIR/scheduler.png: p99 against staleness at MAIN_POINT's load, per strategy
    (ROUND_ROBIN aside) and for the oracle."""
    from bench._plot import lines  # only with --plot: matplotlib is optional

    load = MAIN_POINT[0]
    if (load, staleness[0], "ORACLE") not in grid:
        return None
    series = {name: [grid[load, s, name].p99 * 1e3 for s in staleness] for name in PLOTTED}
    return lines(
        directory / "scheduler.png",
        list(staleness),
        series,
        xlabel="age of the gossiped view when read (s)",
        ylabel="p99 latency (ms)",
        title=f"Simulated p99 at {load:.0%} load ({COORDINATORS} coordinators, {PEERS} peers)",
        dodge=True,
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_acceptance(
    pick_ll_us: float,
    grid: dict[tuple[float, float, str], Outcome],
    staleness: Sequence[float],
    straggler: dict[str, Outcome],
    p2c_runs: dict[tuple[float, str], list[Outcome]],
) -> None:
    print("\n== Acceptance targets ==")
    print(
        f"[{verdict(pick_ll_us <= PICK_TARGET_US)}] LEAST_LOADED per job at 1,000 peers: "
        f"{pick_ll_us:.1f} us (target <= {PICK_TARGET_US:g} us)"
    )
    load, stale = MAIN_POINT
    if (load, stale, "ORACLE") in grid:
        oracle = grid[load, stale, "ORACLE"]
        for name in ("LEAST_LOADED", "LATENCY_OPTIMIZED"):
            ratio = grid[load, stale, name].p99 / oracle.p99
            print(
                f"[{verdict(ratio <= 1.2)}] {load:.0%} load, {stale:g} s stale: {name} p99 = "
                f"{ratio:.2f} x oracle (target <= 1.2)"
            )
        for name in ("MODEL_SPECIFIC", "CAPABILITY_BASED"):
            ratio = grid[load, stale, name].p99 / oracle.p99
            print(
                f"[{verdict(ratio <= 1.5)}] {load:.0%} load, {stale:g} s stale: {name} p99 = "
                f"{ratio:.2f} x oracle (target <= 1.5)"
            )
        best = min(
            (p for p in POLICIES if p.name != "ORACLE"), key=lambda p: grid[load, stale, p.name].p99
        )
        print(
            f"       (best at this point: {best.name}, p99 = "
            f"{grid[load, stale, best.name].p99 / oracle.p99:.2f} x oracle)"
        )
    for (s, name), outcomes in sorted(p2c_runs.items()):
        if name != "LEAST_LOADED":
            continue
        herds = p2c_runs[s, "LEAST_LOADED no-p2c"]
        p2c, herd = _pooled(outcomes), _pooled(herds)
        better = p2c.p99 < herd.p99 and p2c.mean < herd.mean
        print(
            f"[{verdict(better)}] {load:.0%} load, {s:g} s stale, {len(outcomes)} seeds pooled: "
            f"LEAST_LOADED (p2c) mean/p99 {p2c.mean * 1e3:.1f}/{p2c.p99 * 1e3:.1f} ms vs no-p2c "
            f"{herd.mean * 1e3:.1f}/{herd.p99 * 1e3:.1f} ms (target: p2c better)"
        )
        each = ", ".join(
            f"{a.mean * 1e3:.1f}/{a.p99 * 1e3:.1f} vs {b.mean * 1e3:.1f}/{b.p99 * 1e3:.1f}"
            for a, b in zip(outcomes, herds, strict=True)
        )
        print(f"       per seed (mean/p99 ms, p2c vs no-p2c): {each}")
    lat = straggler["LATENCY_OPTIMIZED"].latencies
    within = float(np.mean(lat <= TIMEOUT_S))
    print(
        f"[{verdict(within >= 0.999)}] straggler: LATENCY_OPTIMIZED {within:.4%} within "
        f"{TIMEOUT_S:g} s (target >= 99.9%)"
    )
    bare = float(np.mean(straggler["LATENCY_OPTIMIZED no probes"].latencies <= TIMEOUT_S))
    print(f"       (LATENCY_OPTIMIZED no probes: {bare:.4%} within {TIMEOUT_S:g} s)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--requests", type=int, help="requests counted per simulation point (default 100000)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20000 requests, fewer points"
    )
    parser.add_argument("--skip-real", action="store_true", help="skip the real-process section")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="simulation worker processes"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="write DIR/scheduler.png (needs matplotlib: pip install '.[bench]')",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        from bench._plot import plot_dir  # checks for matplotlib before the run

        args.plot = plot_dir(args.plot)
    requests = args.requests or (20_000 if args.quick else 100_000)
    loads = QUICK_LOADS if args.quick else LOADS
    staleness = QUICK_STALENESS if args.quick else STALENESS
    sizes = DECISION_SIZES

    started = time.perf_counter()
    pick_ll_us = run_decision_time(sizes, args.seed)

    print(
        f"\n== 2. Simulated placement, virtual time: {COORDINATORS} coordinators, "
        f"{PEERS} peers, views snapshot every {SNAPSHOT_S * 1e3:g} ms =="
    )
    grid = run_grid(loads, staleness, requests, args.seed, args.jobs)
    print_grid(grid, loads, staleness, requests)
    if args.plot is not None:
        print(f"figure: {plot_staleness(grid, staleness, args.plot)}")
    straggler = run_straggler(requests, args.seed, args.jobs)
    p2c_runs = run_p2c_seeds(grid, staleness, requests, args.seed, args.jobs)

    print("\n== 3. Real processes ==")
    if args.skip_real:
        print("real process section: skipped (--skip-real)")
    else:
        from bench import real

        real.report(jobs=600 if args.quick else 2000)

    print_acceptance(pick_ll_us, grid, staleness, straggler, p2c_runs)
    print(f"\nwall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
