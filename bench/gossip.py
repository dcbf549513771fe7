"""Gossip on real nodes: convergence, change propagation, failure detection, idle cost.

Usage: python -m bench.gossip [--sizes 10,30,60] [--max-n N] [--steady-seconds 120]
                              [--quick] [--find-max] [--seed 1] [--plot DIR]

For each N, N real nodes (libp2p hosts on loopback, GossipSub, strict signing)
run in ONE trio process via `p2p_node.testing.open_swarm(N, topology="random",
degree=4)`, and in order:

1. converge: from the moment the last node has started (open_swarm yields)
   until `swarm.wait_converged()` returns (every node sees every other alive);
2. change: on ~20 different nodes in turn, `gossip.changed()` (a significant
   change: publish now). Every record carries a seq that grows by one per
   record made, so the change has arrived at a peer once that peer's view holds
   a record of the changed node with seq > the seq before the change. Measured
   from the call: per peer (arrive) and until the last live peer has it (change);
3. kill: `swarm.kill(i)`; per survivor, until i is no longer alive in its view
   (suspect at once for neighbours, gone for the rest by departure or ttl);
4. stall: `swarm.stall(j, 2 x ttl)` (alive, connected, silent); per other node,
   until j has left its view (expected: ttl after j's last beat to its
   neighbours, who then report it; ttl = 3 x interval);
5. steady: `--steady-seconds` with nothing injected. False deaths: LEFT or
   SUSPECT view events about live peers, over every node's view. Idle CPU: the
   process's CPU time over the period / seconds / N, in % of one core. The notes
   also give records taken into views per node per second against what the
   publish rate implies (below it: records are lost or late on the way);
6. rejects: records refused by the topic validators over the run, per reason.

Timings use trio's clock. A step that does not finish within `--step-timeout`
prints as "timeout" (partial figures in the notes under the table); the run
goes on with the next step. One trio process runs on one core: when the nodes
need more than that, records queue, peers expire and the figures degrade; the
"loop lag" note (how late a 100 ms sleep wakes) shows how saturated it was.

`--find-max` looks for the largest N one process holds: it tries 10, 20, 30,
40, 60, 80, ... and stops at the first N that takes over 30 s to converge or
shows a false death in a 20 s steady run, then bisects between the last N that
held and that one down to steps of 5.

The record-rate law (bench.gossip_law, a simulation in virtual time) is printed
after the real runs, for N up to 10,000.

`--plot DIR` also writes DIR/gossip_times.png: convergence, change and detection
times against N, p50 with p99 above it, from the same samples as the table (a step
that timed out is left out); with `--find-max`, DIR/gossip_find_max.png instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from bench import gossip_law
from bench._plot import PLOT_HELP, lines, plot_dir
from gossip import (
    DEFAULT_BUDGET,
    EventKind,
    PeerState,
    ViewSnapshot,
)
from p2p_node import Node
from p2p_node._config import GossipConfig
from p2p_node.testing import ProcessSwarm, Swarm, open_swarm

AnySwarm = Swarm | ProcessSwarm

DEFAULT_SIZES = (10, 30, 60)
CHANGES = 20
FIND_MAX_SIZES = (10, 20, 30, 40, 60, 80, 100, 120, 160, 200)
FIND_MAX_CONVERGE_S = 30.0
FIND_MAX_STEADY_S = 20.0
LAG_TICK_S = 0.1


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Spread:
    """Per-peer times of one step; `complete` is False when the step timed out."""

    samples: list[float] = field(default_factory=list)
    expected: int = 0
    complete: bool = False

    def cell(self, with_max: bool = True) -> str:
        if not self.samples:
            return "timeout" if self.expected else "-"
        parts = [percentile(self.samples, 50), percentile(self.samples, 99)]
        if with_max:
            parts.append(max(self.samples))
        text = "/".join(f"{x:.2f}" for x in parts)
        return text if self.complete else text + "*"

    def note(self, name: str) -> str | None:
        if self.complete:
            return None
        return f"{name}: timeout, {len(self.samples)}/{self.expected} peers before it"


@dataclass
class Run:
    n: int
    started_s: float | None = None  # open_swarm: all n nodes started
    converge_s: float | None = None
    change_last: Spread = field(default_factory=Spread)  # per change: until the last peer
    change_peer: Spread = field(default_factory=Spread)  # per (change, peer)
    publish_delay: list[float] = field(default_factory=list)  # changed() -> record made
    kill: Spread = field(default_factory=Spread)
    stall: Spread = field(default_factory=Spread)
    false_deaths: int | None = None
    false_pairs: int = 0
    cpu_pct_per_node: float | None = None
    cpu_pct_total: float | None = None
    partition_split_s: float | None = None
    heal_s: float | None = None
    false_deaths_after_heal: int | None = None
    records_per_node_s: float | None = None
    lag_p50: float | None = None
    lag_p99: float | None = None
    dropped_events: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- steps ---------------------------------------------------------------------------------


def _alive_ids(swarm: AnySwarm) -> list[str]:
    return [swarm[i].peer_id for i in swarm.live]


def _has_newer(peer_id: str, seq: int, view: ViewSnapshot) -> bool:
    known = view.peers.get(peer_id)
    return known is not None and known.record.seq > seq


def _not_alive(peer_id: str, view: ViewSnapshot) -> bool:
    known = view.peers.get(peer_id)
    return known is None or known.state is not PeerState.ALIVE


def _gone(peer_id: str, view: ViewSnapshot) -> bool:
    return peer_id not in view.peers


# Functions of one node, run where the node is (`swarm.run`): module-level, so that
# they reach worker processes. Times are time.monotonic(), one clock for all processes.


async def _wait_view(node: Node, predicate: Callable[[ViewSnapshot], bool]) -> float:
    await node.view.wait_until(predicate)
    return time.monotonic()


def _alive_count(node: Node) -> int:
    return len(node.view.snapshot().alive())


def _holds(peer_id: str, node: Node) -> bool:
    return peer_id in node.view.snapshot().peers


def _sees_alive(peer_id: str, node: Node) -> bool:
    return not _not_alive(peer_id, node.view.snapshot())


def _change(node: Node) -> int:
    before = node._seq  # every record made after the change has a larger seq
    node.gossip.changed()
    return before


async def _seq_above(node: Node, before: int) -> float:
    # The seq is a plain attribute (no event to wait on): poll it.
    while node._seq <= before:  # noqa: ASYNC110
        await trio.sleep(0.005)
    return time.monotonic()


def _rejects(node: Node) -> dict[str, int]:
    return {str(k): v for k, v in node.gossip.rejects.items()}


async def _steady_watch(
    node: Node, live: frozenset[str], seconds: float
) -> tuple[list[tuple[str, str]], int, int, int]:
    """Over `seconds`: live peers this node saw leave or turn suspect, records it
    took, records it published, view events it dropped."""
    deaths: list[tuple[str, str]] = []
    applied = 0
    published, dropped = node.gossip.published, node.view.dropped_events
    events = node.view.subscribe()
    with trio.move_on_after(seconds):
        async for event in events:
            if event.kind in (EventKind.LEFT, EventKind.SUSPECT):
                if event.peer_id in live:
                    deaths.append((event.peer_id, str(event.kind)))
            else:
                applied += 1
    return (
        deaths,
        applied,
        node.gossip.published - published,
        node.view.dropped_events - dropped,
    )


async def _loop_lag(node: Node, seconds: float) -> list[float]:
    lags: list[float] = []
    with trio.move_on_after(seconds):
        while True:
            due = trio.current_time() + LAG_TICK_S
            await trio.sleep_until(due)
            lags.append(trio.current_time() - due)
    return lags


def _one_per_loop(swarm: AnySwarm) -> list[int]:
    """A live node of each trio loop (each worker process, or the one loop)."""
    owner = getattr(swarm, "owner", None)
    if owner is None:
        return swarm.live[:1]
    first: dict[int, int] = {}
    for i in swarm.live:
        first.setdefault(owner[i], i)
    return list(first.values())


async def _watch_all(
    swarm: AnySwarm,
    observers: Sequence[int],
    predicate: Callable[[ViewSnapshot], bool],
    t0: float,
    out: list[float],
) -> None:
    """Append, per observer, the time from t0 (time.monotonic) until its view
    satisfies `predicate`."""

    async def one(i: int) -> None:
        out.append(await swarm.run(i, _wait_view, predicate) - t0)

    async with trio.open_nursery() as nursery:
        for i in observers:
            nursery.start_soon(one, i)


async def measure_converge(swarm: AnySwarm, run: Run, timeout: float) -> None:
    t0 = trio.current_time()
    with trio.move_on_after(timeout):
        await swarm.wait_converged()
        run.converge_s = trio.current_time() - t0
    if run.converge_s is None:
        seen = sum([await swarm.run(i, _alive_count) for i in swarm.live]) / len(swarm.live)
        run.notes.append(
            f"converge: timeout after {timeout:g} s; a node sees {seen:.1f} of "
            f"{len(swarm.live) - 1} peers alive on average"
        )


async def settle(swarm: AnySwarm, run: Run, after: str, timeout: float) -> None:
    """Wait for convergence between steps, so one step's disturbance ends before the next."""
    with trio.move_on_after(timeout) as scope:
        await swarm.wait_converged()
    if scope.cancelled_caught:
        run.notes.append(f"did not reconverge within {timeout:g} s after {after}")


async def measure_changes(
    swarm: AnySwarm, run: Run, rng: random.Random, timeout: float, per_change: float
) -> None:
    # Rounds over every live node in a shuffled order: a node changes again only after
    # all others have, so its pacer has its tokens back (each change meets a quiet node).
    picks: list[int] = []
    while len(picks) < CHANGES:
        round_ = rng.sample(swarm.live, len(swarm.live))
        if picks and round_[0] == picks[-1]:
            round_.append(round_.pop(0))
        picks.extend(round_)
    picks = picks[:CHANGES]
    run.change_last.expected = run.change_peer.expected = len(picks)
    timed_out = 0
    with trio.move_on_after(timeout) as step:
        for i in picks:
            others = [j for j in swarm.live if j != i]
            arrivals: list[float] = []
            t0 = time.monotonic()
            before = await swarm.run(i, _change)
            with trio.move_on_after(per_change) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_publish_delay, swarm, i, before, t0, run.publish_delay)
                    nursery.start_soon(
                        _watch_all,
                        swarm,
                        others,
                        partial(_has_newer, swarm[i].peer_id, before),
                        t0,
                        arrivals,
                    )
            run.change_peer.samples.extend(arrivals)
            if scope.cancelled_caught:
                timed_out += 1
            else:
                run.change_last.samples.append(max(arrivals, default=0.0))
    if step.cancelled_caught:
        run.notes.append(
            f"change: step timeout after {timeout:g} s, "
            f"{len(run.change_last.samples)}/{len(picks)} changes reached every peer"
        )
    elif timed_out:
        run.notes.append(
            f"change: {timed_out}/{len(picks)} changes did not reach every peer "
            f"within {per_change:g} s"
        )
    run.change_last.complete = run.change_peer.complete = not (step.cancelled_caught or timed_out)
    if run.change_peer.samples:
        run.notes.append(
            "change: arrival per peer p50/p99 "
            f"{percentile(run.change_peer.samples, 50):.3f}/"
            f"{percentile(run.change_peer.samples, 99):.3f} s over "
            f"{len(run.change_peer.samples)} (change, peer) pairs"
        )
    if run.publish_delay:
        run.notes.append(
            "change: changed() -> record made p50/p99 "
            f"{percentile(run.publish_delay, 50) * 1e3:.1f}/"
            f"{percentile(run.publish_delay, 99) * 1e3:.1f} ms (polled every 5 ms)"
        )


async def _publish_delay(swarm: AnySwarm, i: int, before: int, t0: float, out: list[float]) -> None:
    out.append(await swarm.run(i, _seq_above, before) - t0)


async def measure_kill(swarm: AnySwarm, run: Run, rng: random.Random, timeout: float) -> None:
    victim = rng.choice(swarm.live)
    victim_id = swarm[victim].peer_id
    survivors = [j for j in swarm.live if j != victim]
    # Only a survivor that sees the victim alive can see it drop.
    observers = [j for j in survivors if await swarm.run(j, partial(_sees_alive, victim_id))]
    run.kill.expected = len(observers)
    kill_call: list[float] = []
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            nursery.start_soon(
                _watch_all, swarm, observers, partial(_not_alive, victim_id), t0, run.kill.samples
            )
            await swarm.kill(victim)
            kill_call.append(time.monotonic() - t0)
    run.kill.complete = len(run.kill.samples) == len(observers)
    if note := run.kill.note("kill"):
        run.notes.append(note)
    if len(observers) < len(survivors):
        run.notes.append(f"kill: {len(observers)}/{len(survivors)} survivors saw it alive before")
    if not kill_call:
        run.notes.append(f"kill: swarm.kill({victim}) had not returned after {timeout:g} s")
    elif kill_call[0] > 1.0:
        run.notes.append(f"kill: swarm.kill({victim}) took {kill_call[0]:.1f} s to return")


async def measure_stall(
    swarm: AnySwarm, run: Run, rng: random.Random, ttl: float, timeout: float
) -> None:
    j = rng.choice(swarm.live)
    stalled = swarm[j].peer_id
    others = [i for i in swarm.live if i != j]
    # Only a node that holds j's record can see it leave.
    observers = [i for i in others if await swarm.run(i, partial(_holds, stalled))]
    run.stall.expected = len(observers)
    with trio.move_on_after(timeout):
        t0 = time.monotonic()
        swarm.stall(j, seconds=2 * ttl)
        await _watch_all(swarm, observers, partial(_gone, stalled), t0, run.stall.samples)
    run.stall.complete = len(run.stall.samples) == len(observers)
    if note := run.stall.note("stall"):
        run.notes.append(note)
    seen = "" if len(observers) == len(others) else f"; {len(observers)}/{len(others)} held it"
    run.notes.append(f"stall: ttl {ttl:g} s, silent for {2 * ttl:g} s{seen}")


async def measure_steady(swarm: AnySwarm, run: Run, seconds: float) -> None:
    live = frozenset(_alive_ids(swarm))
    results: dict[int, tuple[list[tuple[str, str]], int, int, int]] = {}
    lags: list[float] = []

    async def watch(i: int) -> None:
        results[i] = await swarm.run(i, _steady_watch, live, seconds)

    async def lag(i: int) -> None:
        lags.extend(await swarm.run(i, _loop_lag, seconds))

    cpu0, t0 = await swarm.cpu_seconds(), trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in swarm.live:
            nursery.start_soon(watch, i)
        for i in _one_per_loop(swarm):
            nursery.start_soon(lag, i)
    cpu, elapsed = await swarm.cpu_seconds() - cpu0, trio.current_time() - t0
    n = len(swarm.live)
    deaths = [(i, p, k) for i, (d, _, _, _) in results.items() for p, k in d]
    applied = sum(r[1] for r in results.values())
    published = sum(r[2] for r in results.values())
    run.false_deaths = len(deaths)
    run.false_pairs = len({(i, p) for i, p, _ in deaths})
    run.cpu_pct_total = 100 * cpu / elapsed
    run.cpu_pct_per_node = run.cpu_pct_total / n
    run.records_per_node_s = published / elapsed / n
    run.dropped_events = sum(r[3] for r in results.values())
    if lags:
        run.lag_p50, run.lag_p99 = percentile(lags, 50), percentile(lags, 99)
    kinds = Counter(k for _, _, k in deaths)
    run.notes.append(
        f"steady {elapsed:.0f} s: CPU {run.cpu_pct_total:.0f}% of one core (all processes), "
        f"{run.records_per_node_s:.2f} records/s published per node "
        f"(every node should take ~{run.records_per_node_s * (n - 1):.0f}/s, "
        f"took {applied / elapsed / n:.1f}/s), "
        f"loop lag p50/p99 {run.lag_p50 or 0:.3f}/{run.lag_p99 or 0:.3f} s, "
        f"machine load avg (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        + (
            f", false deaths {dict(kinds)} on {run.false_pairs} (observer, peer) pairs"
            if deaths
            else ""
        )
        + (f", {run.dropped_events} view events dropped" if run.dropped_events else "")
    )


AFTER_HEAL_S = 10.0  # how long views are watched for false deaths once whole after a heal


async def measure_partition(
    swarm: AnySwarm, run: Run, split_s: float, timeout: float, watch_s: float = AFTER_HEAL_S
) -> None:
    """Cut the live nodes 50/50 (by index; with namespaces, by whole workers), wait
    until each side has dropped the other (at most `split_s`: a node left without
    a link on its side learns nothing until records expire), then heal: the time
    until every view is whole again."""
    live = swarm.live
    half = len(live) // 2
    left, right = live[:half], live[half:]
    if getattr(swarm, "netns", None) is not None:  # cuts whole workers: split by worker
        owner = swarm.owner  # type: ignore[union-attr]
        workers = sorted({owner[i] for i in live})
        cut = workers[: max(1, len(workers) // 2)]
        left = [i for i in live if owner[i] in cut]
        right = [i for i in live if owner[i] not in cut]
    t0 = time.monotonic()
    await swarm.partition([left, right])
    split: list[float] = []
    with trio.move_on_after(split_s) as scope:
        async with trio.open_nursery() as nursery:
            for side, other in ((left, right), (right, left)):
                ids = frozenset(swarm[j].peer_id for j in other)
                nursery.start_soon(_watch_all, swarm, side, partial(_none_alive, ids), t0, split)
    if scope.cancelled_caught:
        run.notes.append(
            f"partition: {len(split)}/{len(live)} nodes dropped the other side within {split_s:g} s"
        )
    else:
        run.partition_split_s = max(split)
    t1 = trio.current_time()
    await swarm.heal()
    with trio.move_on_after(timeout):
        await swarm.wait_converged()
        run.heal_s = trio.current_time() - t1
    if run.heal_s is not None:  # then no view may lose a live peer (a false death)
        alive = frozenset(_alive_ids(swarm))
        deaths: list[tuple[str, str]] = []

        async def watch(i: int) -> None:
            deaths.extend((await swarm.run(i, _steady_watch, alive, watch_s))[0])

        async with trio.open_nursery() as nursery:
            for i in swarm.live:
                nursery.start_soon(watch, i)
        run.false_deaths_after_heal = len(deaths)
    run.notes.append(
        f"partition {len(left)}/{len(right)}: every node dropped the other side after "
        f"{_fmt(run.partition_split_s)} s; whole again {_fmt(run.heal_s)} s after the heal"
        + (
            f", then {run.false_deaths_after_heal} false deaths in {watch_s:g} s"
            if run.false_deaths_after_heal is not None
            else ""
        )
    )


def _none_alive(peer_ids: frozenset[str], view: ViewSnapshot) -> bool:
    return all(_not_alive(p, view) for p in peer_ids)


# --- one N ---------------------------------------------------------------------------------


async def bench_one(n: int, args: argparse.Namespace) -> Run:
    run = Run(n)
    rng = random.Random(args.seed * 1000 + n)
    config = GossipConfig(interval=args.interval)
    ttl = config.liveness_ttl  # beats: a silent node is reported after this
    timeout = args.step_timeout
    wall0 = time.perf_counter()
    log(f"N={n}: starting")
    start = trio.current_time()
    # A hard cap on the whole N, so a wedged step cannot stop the benchmark.
    with trio.move_on_after(8 * timeout + 2 * args.steady_seconds) as whole:
        async with open_swarm(
            n,
            topology="random",
            degree=4,
            seed=args.seed,
            gossip=config,
            processes=args.processes,
            namespaces=args.namespaces,
        ) as swarm:
            run.started_s = trio.current_time() - start
            log(f"N={n}: {n} nodes started in {run.started_s:.1f} s; converging")
            await measure_converge(swarm, run, timeout)
            log(f"N={n}: converge {_fmt(run.converge_s)} s; changes")
            await measure_changes(swarm, run, rng, timeout, per_change=max(15.0, 5 * ttl))
            await settle(swarm, run, "the changes", args.settle_timeout)
            log(f"N={n}: change {run.change_last.cell(False)} s; kill")
            await measure_kill(swarm, run, rng, timeout)
            await settle(swarm, run, "the kill", args.settle_timeout)
            log(f"N={n}: kill {run.kill.cell()} s; stall")
            await measure_stall(swarm, run, rng, ttl, timeout)
            # The stalled node comes back after 2 x ttl; let every view take it back.
            await trio.sleep(ttl)
            await settle(swarm, run, "the stall", args.settle_timeout)
            log(f"N={n}: stall {run.stall.cell()} s; steady {args.steady_seconds:g} s")
            await measure_steady(swarm, run, args.steady_seconds)
            for i in swarm.live:
                run.rejects.update(await swarm.run(i, _rejects))
            if not args.no_partition:
                log(f"N={n}: false deaths {run.false_deaths}; partition 50/50 and heal")
                await measure_partition(swarm, run, 10 * ttl, timeout)
            log(f"N={n}: stopping")
    if whole.cancelled_caught:
        run.notes.append("aborted: the whole run for this N hit its time cap")
    run.wall_s = time.perf_counter() - wall0
    log(f"N={n}: done in {run.wall_s:.0f} s")
    return run


# --- find-max ------------------------------------------------------------------------------


@dataclass
class Trial:
    n: int
    converge_s: float | None = None
    false_deaths: int | None = None
    cpu_pct_per_node: float | None = None
    cpu_pct_total: float | None = None
    lag_p99: float | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return self.converge_s is not None and self.false_deaths == 0


async def trial(n: int, args: argparse.Namespace) -> Trial:
    out = Trial(n)
    run = Run(n)
    wall0 = time.perf_counter()
    config = GossipConfig(interval=args.interval)
    log(f"find-max N={n}: starting")
    with trio.move_on_after(FIND_MAX_CONVERGE_S + FIND_MAX_STEADY_S + 10 * n + 60):
        async with open_swarm(
            n,
            topology="random",
            degree=4,
            seed=args.seed,
            gossip=config,
            processes=args.processes,
            namespaces=args.namespaces,
        ) as swarm:
            await measure_converge(swarm, run, FIND_MAX_CONVERGE_S)
            out.converge_s = run.converge_s
            # Also after a failed convergence: its CPU and delivery figures say why.
            await measure_steady(swarm, run, FIND_MAX_STEADY_S)
            out.false_deaths = run.false_deaths
            out.cpu_pct_per_node = run.cpu_pct_per_node
            out.cpu_pct_total = run.cpu_pct_total
            out.lag_p99 = run.lag_p99
    out.wall_s = time.perf_counter() - wall0
    out.notes = run.notes
    log(
        f"find-max N={n}: converge {_fmt(out.converge_s)} s, false deaths "
        f"{_fmt(out.false_deaths, '-')}, {out.wall_s:.0f} s"
    )
    return out


async def find_max(args: argparse.Namespace) -> None:
    trials = []
    for n in FIND_MAX_SIZES:
        if n > args.find_max_limit:
            break
        trials.append(await trial(n, args))
        if not trials[-1].holds:
            break
    # Between the last N that held and the first that did not, bisect down to steps of 5.
    held = [t.n for t in trials if t.holds]
    if held and not trials[-1].holds:
        low, high = held[-1], trials[-1].n
        while high - low > 5:
            middle = (low + high) // 2
            trials.append(await trial(middle, args))
            low, high = (middle, high) if trials[-1].holds else (low, middle)
    trials.sort(key=lambda t: t.n)
    print(
        f"largest N {_where(args)} hold: converge within {FIND_MAX_CONVERGE_S:g} s and no "
        f"false death in a {FIND_MAX_STEADY_S:g} s steady run (interval {args.interval:g} s)"
    )
    print(
        f"{'N':>4} {'converge s':>11} {'false deaths':>13} {'CPU %/node':>11} "
        f"{'CPU % total':>12} {'lag p99 s':>10} {'wall s':>7}  holds"
    )
    for t in trials:
        print(
            f"{t.n:>4} {_fmt(t.converge_s, 'timeout'):>11} {_fmt(t.false_deaths, '-'):>13} "
            f"{_fmt(t.cpu_pct_per_node, '-', 1):>11} {_fmt(t.cpu_pct_total, '-', 0):>12} "
            f"{_fmt(t.lag_p99, '-', 3):>10} {t.wall_s:>7.0f}  {'yes' if t.holds else 'NO'}"
        )
    held = [t.n for t in trials if t.holds]
    failed = [t.n for t in trials if not t.holds]
    if not held:
        print("result: not even the smallest N held")
    elif not failed:
        print(f"result: every N tried held, up to {held[-1]} (raise --find-max-limit)")
    else:
        print(f"result: largest N that held: {held[-1]} (smallest that failed: {failed[0]})")
    print("notes:")
    for t in trials:
        for note in t.notes:
            print(f"  N={t.n}: {note}")
    if args.plot:
        print(f"figure: {plot_trials(trials, args, args.plot)}")


# --- printing ------------------------------------------------------------------------------


def _fmt(value: float | None, missing: str = "timeout", digits: int = 2) -> str:
    if value is None:
        return missing
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


COLUMNS = (
    ("N", 4),
    ("converge s", 10),
    ("change p50/p99 s", 16),
    ("arrive p50/p99 s", 16),
    ("kill drop p50/p99/max s", 23),
    ("stall drop p50/p99/max s", 24),
    ("false deaths", 12),
    ("idle CPU %/node", 15),
    ("heal s", 7),
    ("rejects", 7),
)


def print_runs(runs: Sequence[Run], args: argparse.Namespace) -> None:
    print(
        f"real nodes in {_where(args)}, topology random degree 4, interval "
        f"{args.interval:g} s, steady {args.steady_seconds:g} s, step timeout "
        f"{args.step_timeout:g} s; change = until the last peer has it, arrive = per peer; "
        "* = some timed out (see notes)"
    )
    print(" | ".join(f"{name:>{width}}" for name, width in COLUMNS))
    for r in runs:
        rejects = sum(r.rejects.values())
        cells = (
            str(r.n),
            _fmt(r.converge_s),
            r.change_last.cell(with_max=False),
            r.change_peer.cell(with_max=False),
            r.kill.cell(),
            r.stall.cell(),
            _fmt(r.false_deaths, "-"),
            _fmt(r.cpu_pct_per_node, "-", 1),
            _fmt(r.heal_s, "-"),
            str(rejects)
            + (
                " (" + ", ".join(f"{k} {v}" for k, v in sorted(r.rejects.items())) + ")"
                if rejects
                else ""
            ),
        )
        print(" | ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    print("notes:")
    for r in runs:
        started = f"{r.started_s:.1f} s" if r.started_s is not None else "-"
        print(f"  N={r.n}: wall {r.wall_s:.0f} s, {r.n} nodes started in {started}")
        for note in r.notes:
            print(f"    {note}")


def _where(args: argparse.Namespace) -> str:
    if args.processes <= 1 and not args.namespaces:
        return "one trio process"
    return f"{args.processes} worker processes" + (
        ", each in a network namespace" if args.namespaces else ""
    )


def print_law(quick: bool) -> None:
    print()
    print("record-rate law (bench.gossip_law.simulate, virtual time):")
    print(gossip_law.LEGEND.format(budget=DEFAULT_BUDGET))
    print(gossip_law.HEADER)
    rates = gossip_law.CHANGE_RATES[:1] if quick else gossip_law.CHANGE_RATES
    for change_rate in rates:
        for n in gossip_law.SIZES:
            started = time.perf_counter()
            figures = gossip_law.simulate(n, gossip_law.default_seconds(n), change_rate, 1)
            print(gossip_law.format_row(figures, time.perf_counter() - started), flush=True)


# --- plots ---------------------------------------------------------------------------------


def _p(spread: Spread, q: float) -> float | None:
    return percentile(spread.samples, q) if spread.complete and spread.samples else None


def plot_runs(runs: Sequence[Run], args: argparse.Namespace, directory: Path) -> Path:
    steps = {
        "change, until the last peer": [r.change_last for r in runs],
        "change, arrival per peer": [r.change_peer for r in runs],
        "kill, until a survivor drops it": [r.kill for r in runs],
        "stall, until a node drops it": [r.stall for r in runs],
    }
    series: dict[str, list[float | None]] = {"converge": [r.converge_s for r in runs]}
    upper: dict[str, list[float | None]] = {}
    for name, spreads in steps.items():
        series[name] = [_p(s, 50) for s in spreads]
        upper[name] = [_p(s, 99) for s in spreads]
    return lines(
        directory / "gossip_times.png",
        [r.n for r in runs],
        series,
        upper=upper,
        dodge=True,
        xlabel="N (real nodes in one process)",
        ylabel="seconds (dot: p50, dash: p99)",
        title=f"bench.gossip: interval {args.interval:g} s, random topology, degree 4",
    )


def plot_trials(trials: Sequence[Trial], args: argparse.Namespace, directory: Path) -> Path:
    return lines(
        directory / "gossip_find_max.png",
        [t.n for t in trials],
        {"converge": [t.converge_s for t in trials]},
        xlabel="N (real nodes in one process); no point: did not converge",
        ylabel="seconds to converge",
        title=f"bench.gossip --find-max: interval {args.interval:g} s",
    )


# --- main ----------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sizes must be integers like 10,30,60: {text!r}"
        ) from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("every size must be >= 2")
    return sizes


async def main_async(args: argparse.Namespace) -> None:
    if args.find_max:
        await find_max(args)
        return
    runs = []
    for n in args.sizes:
        runs.append(await bench_one(n, args))
    print_runs(runs, args)
    if args.plot:
        print(f"figure: {plot_runs(runs, args, args.plot)}")
    if not args.no_law:
        print_law(args.quick)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="10,30,60")
    parser.add_argument("--max-n", type=int, help="also run this N (e.g. what --find-max found)")
    parser.add_argument("--steady-seconds", type=float, default=120.0)
    parser.add_argument("--step-timeout", type=float, default=120.0)
    parser.add_argument(
        "--settle-timeout", type=float, default=30.0, help="reconverging between steps, s"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="gossip interval, s")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=10, steady 10 s")
    parser.add_argument("--find-max", action="store_true", help="find the largest N that holds")
    parser.add_argument("--find-max-limit", type=int, default=200)
    parser.add_argument("--no-law", action="store_true", help="skip the record-rate law table")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--processes", type=int, default=1, help="spread the nodes over K worker processes"
    )
    parser.add_argument(
        "--namespaces", action="store_true", help="each worker in a network namespace (root)"
    )
    parser.add_argument("--no-partition", action="store_true", help="skip the 50/50 partition")
    parser.add_argument("--plot", type=Path, metavar="DIR", help=PLOT_HELP)
    args = parser.parse_args(argv)
    args.plot = plot_dir(args.plot)
    if args.quick:
        args.sizes, args.steady_seconds = [10], 10.0
    if args.max_n and args.max_n not in args.sizes:
        args.sizes.append(args.max_n)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    trio.run(main_async, args)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    # Run this module's main as bench.gossip, not __main__: the functions it sends to
    # worker processes must pickle by a name they can import.
    from bench.gossip import main as _main

    _main()
