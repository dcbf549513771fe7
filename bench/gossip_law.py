"""How gossip's record rate scales: the interval law, simulated up to 10,000 peers.

Usage: python -m bench.gossip_law [--sizes 10 100 10000] [--change-rates 0.2 5] [--seed 1]

The law (gossip._pacing, p2p_node._gossip.Gossip.publish_forever): every node
receives every record, so with N nodes

    interval(N) = max(base, N / budget)       base 1 s, budget 200 records/s
    refresh(N)  = max(refresh, N / budget)    refresh 120 s
    received rate per node = N x (records one node makes per second)
                           <= N / interval(N) <= budget    (+ N x burst / W over a window W)

A node publishes when something significant changed, at once while its token
bucket (burst 2, one token per interval(N)) has a token, else when it has one;
with nothing changed, once per refresh(N). A peer's record expires from the
views after 3 x refresh(N): a fallback only, since liveness is by beats between
neighbours, which cost the same whatever N is.

The simulation runs in virtual time (no sleeps). N nodes boot at uniform times
over the first interval, each with a full view (interval(N) from the start)
and "significant changes" arriving as a Poisson process of `change_rate` per
second. Given the intervals, nodes do not interact, so each node's timeline is
run on its own: an event loop that wakes at the pacer's next due time, the next
refresh or the next change. Changes come from a seeded numpy Generator
(vectorised per node). Figures per N:

- records/s: publishes by all nodes in [0, seconds] / seconds, which is what each
  node receives; steady: the same after a warm-up of 3 intervals;
- delay: from a change to the publish that carries it, p50/p99 over all changes;
- max gap: the longest silence of any node, to compare with the refresh.
"""

from __future__ import annotations

import argparse
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gossip._pacing import (
    DEFAULT_BUDGET,
    DEFAULT_BURST,
    DEFAULT_INTERVAL,
    PublishPacer,
    publish_interval,
)
from p2p_node._config import GossipConfig

DEFAULT_REFRESH = GossipConfig().refresh

SIZES = (10, 30, 60, 100, 300, 1000, 3000, 10_000)
CHANGE_RATES = (0.2, 5.0)  # significant changes per second per node: typical, heavy
TTL_FACTOR = 3.0
WARM_UP_INTERVALS = 3.0


@dataclass(frozen=True, slots=True)
class LawFigures:
    n: int
    change_rate: float  # changes per second per node
    seconds: float  # virtual time simulated
    interval: float  # least time between records on change (on average), seconds
    refresh: float  # time between records with nothing changed, seconds
    ttl: float  # a record no one renews leaves the views after this, seconds
    records_per_s: float  # received by each node (= published by all), whole run
    steady_per_s: float  # the same, after the warm-up
    budget_ratio: float  # records_per_s / budget
    delay_p50: float  # change -> publish, seconds
    delay_p99: float
    delay_max: float
    max_gap: float  # longest silence of any node, seconds
    publishes: int
    changes: int


def default_seconds(
    n: int, budget: float = DEFAULT_BUDGET, refresh: float = DEFAULT_REFRESH
) -> float:
    """Long enough for the steady state: 3 refreshes or 10 intervals, whichever is longer."""
    return max(
        3 * publish_interval(n - 1, refresh, budget), 10 * publish_interval(n - 1, budget=budget)
    )


def _node_timeline(
    changes: list[float], boot: float, interval: float, refresh: float, seconds: float, burst: float
) -> list[float]:
    """Publish times of one node that boots at `boot` and sees `changes` (sorted, <= seconds),
    as Gossip.publish_forever decides them.

    Runs past `seconds` until every change has been published, so each has a delay.
    """
    pacer = PublishPacer(burst)
    publishes: list[float] = []
    served = 0  # changes before this index are published
    t = last = boot
    due = True  # a node publishes as it starts
    while True:
        changed = served < len(changes) and changes[served] <= t
        if due or (changed and pacer.due(t, interval, changed=True)):
            pacer.published(t, interval)
            publishes.append(t)
            last = t
            served = bisect_right(changes, t, served)
            changed = False
        wake = last + refresh
        if changed:
            wake = min(wake, pacer.next_due(t, interval, changed=True))
        elif served < len(changes):
            wake = min(wake, changes[served])
        if wake > seconds and served == len(changes):
            return publishes
        t = wake
        due = t - last >= refresh


def simulate(
    n: int,
    seconds: float,
    change_rate: float,
    seed: int,
    *,
    budget: float = DEFAULT_BUDGET,
    base_interval: float = DEFAULT_INTERVAL,
    base_refresh: float = DEFAULT_REFRESH,
    burst: float = DEFAULT_BURST,
) -> LawFigures:
    """Simulate `n` nodes for `seconds` of virtual time and measure the law's figures."""
    if n < 1 or seconds <= 0 or change_rate < 0:
        raise ValueError(
            f"need n >= 1, seconds > 0, change_rate >= 0; got {n}, {seconds}, {change_rate}"
        )
    rng = np.random.default_rng(seed)
    interval = publish_interval(n - 1, base_interval, budget)
    refresh = publish_interval(n - 1, base_refresh, budget)
    warm_up = min(WARM_UP_INTERVALS * interval, seconds / 2)
    published = steady = 0
    max_gap = 0.0
    delays: list[np.ndarray] = []
    for boot in rng.uniform(0.0, min(interval, seconds), n):
        count = rng.poisson(change_rate * (seconds - boot))
        changes = np.sort(rng.uniform(boot, seconds, count))
        timeline = _node_timeline(changes.tolist(), float(boot), interval, refresh, seconds, burst)
        publishes = np.array(timeline)
        in_run = publishes[publishes <= seconds]
        published += len(in_run)
        steady += int(np.count_nonzero(in_run >= warm_up))
        max_gap = max(max_gap, float(np.diff(np.append(in_run, seconds)).max()))
        carrier = np.searchsorted(publishes, changes, side="left")
        delays.append((publishes[carrier] - changes).astype(np.float32))
    all_delays = np.concatenate(delays) if delays else np.zeros(0, np.float32)
    p50, p99, worst = (
        np.quantile(all_delays, [0.5, 0.99, 1.0]).tolist() if all_delays.size else [0.0] * 3
    )
    return LawFigures(
        n=n,
        change_rate=change_rate,
        seconds=seconds,
        interval=interval,
        refresh=refresh,
        ttl=TTL_FACTOR * refresh,
        records_per_s=published / seconds,
        steady_per_s=steady / (seconds - warm_up),
        budget_ratio=published / seconds / budget,
        delay_p50=p50,
        delay_p99=p99,
        delay_max=worst,
        max_gap=max_gap,
        publishes=published,
        changes=int(all_delays.size),
    )


LEGEND = (
    f"interval(N) = max({DEFAULT_INTERVAL:g} s, N / {{budget:g}}), on change; "
    f"refresh(N) = max({DEFAULT_REFRESH:g} s, N / {{budget:g}}), with nothing changed; "
    f"ttl = {TTL_FACTOR:g} x refresh; burst {DEFAULT_BURST:g}; "
    f"recv/s = records each node receives (all nodes' publishes)"
)
HEADER = (
    f"{'chg/s':>6} {'N':>6} {'interval':>9} {'refresh':>8} {'ttl':>8} {'recv/s':>8} {'/budget':>8} "
    f"{'steady/s':>9} {'delay p50':>10} {'p99':>8} {'max':>8} {'max gap':>8} {'wall':>6}"
)


def format_row(f: LawFigures, wall_s: float) -> str:
    return (
        f"{f.change_rate:>6g} {f.n:>6} {f.interval:>8.3f}s {f.refresh:>7.0f}s {f.ttl:>7.0f}s "
        f"{f.records_per_s:>8.1f} {f.budget_ratio:>8.3f} {f.steady_per_s:>9.1f} "
        f"{f.delay_p50:>9.3f}s {f.delay_p99:>7.3f}s {f.delay_max:>7.3f}s "
        f"{f.max_gap:>7.2f}s {wall_s:>5.1f}s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--change-rates", type=float, nargs="+", default=list(CHANGE_RATES))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--seconds", type=float, help="default: max(120 s, 10 intervals)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    print(LEGEND.format(budget=args.budget))
    print(HEADER)
    for change_rate in args.change_rates:
        for n in args.sizes:
            seconds = args.seconds or default_seconds(n, args.budget)
            started = time.perf_counter()
            figures = simulate(n, seconds, change_rate, args.seed, budget=args.budget)
            print(format_row(figures, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
