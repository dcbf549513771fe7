"""How gossip's record rate scales: the interval law, simulated up to 10,000 peers.

Usage: python -m bench.gossip_law [--sizes 10 100 10000] [--change-rates 0.2 5] [--seed 1]

The law (gossip._pacing): every node receives every record, so with N nodes

    interval(N) = max(base, N / budget)                     base 1 s, budget 200 records/s
    received rate per node = N / interval(N) <= budget      (+ N x burst / W over a window W)
    detection of a silent node = ttl = 3 x interval(N)

Each node paces itself with a PublishPacer (token bucket: burst 2, one token per
interval): a periodic publish when the bucket is full (every interval while
nothing changes), a change at once while a token is there, else when one is.

The simulation runs in virtual time (no sleeps). N nodes boot at uniform times
over the first interval, each with a full view (interval(N) from the start)
and "significant changes" arriving as a Poisson process of `change_rate` per
second. Given the interval, nodes do not interact, so each node's timeline is
run on its own: an event loop that wakes at the pacer's next due time or the
next change. Changes come from a seeded numpy Generator (vectorised per node).
Figures per N:

- records/s: publishes by all nodes in [0, seconds] / seconds, which is what each
  node receives; steady: the same after a warm-up of 3 intervals;
- delay: from a change to the publish that carries it, p50/p99 over all changes;
- max gap: the longest silence of any node, to compare with the ttl.
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

SIZES = (10, 30, 60, 100, 300, 1000, 3000, 10_000)
CHANGE_RATES = (0.2, 5.0)  # significant changes per second per node: typical, heavy
TTL_FACTOR = 3.0
WARM_UP_INTERVALS = 3.0


@dataclass(frozen=True, slots=True)
class LawFigures:
    n: int
    change_rate: float  # changes per second per node
    seconds: float  # virtual time simulated
    interval: float  # publish interval of every node, seconds
    ttl: float  # a silent node leaves the views after this, seconds
    records_per_s: float  # received by each node (= published by all), whole run
    steady_per_s: float  # the same, after the warm-up
    budget_ratio: float  # records_per_s / budget
    delay_p50: float  # change -> publish, seconds
    delay_p99: float
    delay_max: float
    max_gap: float  # longest silence of any node, seconds
    publishes: int
    changes: int


def default_seconds(n: int, budget: float = DEFAULT_BUDGET) -> float:
    """Long enough for the steady state: 120 s or 10 intervals, whichever is longer."""
    return max(120.0, 10 * publish_interval(n - 1, budget=budget))


def _node_timeline(
    changes: list[float], boot: float, interval: float, seconds: float, burst: float
) -> list[float]:
    """Publish times of one node that boots at `boot` and sees `changes` (sorted, <= seconds).

    Runs past `seconds` until every change has been published, so each has a delay.
    """
    pacer = PublishPacer(burst)
    publishes: list[float] = []
    served = 0  # changes before this index are published
    t = boot
    while True:
        changed = served < len(changes) and changes[served] <= t
        if pacer.due(t, interval, changed):
            pacer.published(t, interval)
            publishes.append(t)
            served = bisect_right(changes, t, served)
            changed = False
        wake = pacer.next_due(t, interval, changed)
        if not changed and served < len(changes):
            wake = min(wake, changes[served])
        if wake > seconds and served == len(changes):
            return publishes
        t = wake


def simulate(
    n: int,
    seconds: float,
    change_rate: float,
    seed: int,
    *,
    budget: float = DEFAULT_BUDGET,
    base_interval: float = DEFAULT_INTERVAL,
    burst: float = DEFAULT_BURST,
) -> LawFigures:
    """Simulate `n` nodes for `seconds` of virtual time and measure the law's figures."""
    if n < 1 or seconds <= 0 or change_rate < 0:
        raise ValueError(
            f"need n >= 1, seconds > 0, change_rate >= 0; got {n}, {seconds}, {change_rate}"
        )
    rng = np.random.default_rng(seed)
    interval = publish_interval(n - 1, base_interval, budget)
    warm_up = min(WARM_UP_INTERVALS * interval, seconds / 2)
    published = steady = 0
    max_gap = 0.0
    delays: list[np.ndarray] = []
    for boot in rng.uniform(0.0, min(interval, seconds), n):
        count = rng.poisson(change_rate * (seconds - boot))
        changes = np.sort(rng.uniform(boot, seconds, count))
        timeline = _node_timeline(changes.tolist(), float(boot), interval, seconds, burst)
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
        ttl=TTL_FACTOR * interval,
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


HEADER = (
    f"{'chg/s':>6} {'N':>6} {'interval':>9} {'ttl':>8} {'recv/s':>8} {'/budget':>8} "
    f"{'steady/s':>9} {'delay p50':>10} {'p99':>8} {'max':>8} {'max gap':>8} {'wall':>6}"
)


def format_row(f: LawFigures, wall_s: float) -> str:
    return (
        f"{f.change_rate:>6g} {f.n:>6} {f.interval:>8.3f}s {f.ttl:>7.2f}s "
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

    print(
        f"interval(N) = max({DEFAULT_INTERVAL:g} s, N / {args.budget:g}); "
        f"ttl = {TTL_FACTOR:g} x interval; burst {DEFAULT_BURST:g}; "
        f"recv/s = records each node receives (all nodes' publishes)"
    )
    print(HEADER)
    for change_rate in args.change_rates:
        for n in args.sizes:
            seconds = args.seconds or default_seconds(n, args.budget)
            started = time.perf_counter()
            figures = simulate(n, seconds, change_rate, args.seed, budget=args.budget)
            print(format_row(figures, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
