"""When a node publishes its record: an interval that grows with the network, and a token bucket.

Every node receives every record, so a network of N publishers, each publishing
once per `interval`, costs every node N / interval records per second. To keep
that under `budget` records/s the interval follows the view size:

    interval(N) = max(base_interval, N / budget)        N = view size + 1 (the node itself)

so the whole network's rate is N / interval(N) <= budget (equality once N > budget x base).

A node uses the law twice (p2p_node's `Gossip.publish_forever`): with the base
`interval` (1 s by default) to pace records made on change, and with the base
`refresh` (120 s by default, `GossipConfig.refresh`) to republish its record when
nothing changed. A record announces its refresh interval, and a peer no
neighbour vouches for is dropped when its record is 3 x that old; liveness
itself comes from beats between neighbours, not from records.

Records made on change are paced by `PublishPacer`, a token bucket refilled at
one token per interval and holding at most `burst` tokens; every publish spends
one, refreshes included. A change is published as soon as the bucket holds a
token. Over any window of W seconds the publishes made on change number at most
W / interval + burst, so the network's rate over W is at most
budget + N x burst / W, plus the refreshes (one per node per refresh interval).

The default burst, 1.5: a change after an interval of quiet is published at
once, one right after it waits half an interval, and in a storm of changes each
waits at most one interval.

`PublishPacer` can also pace the publishes made with nothing changed
(`changed=False`: due when the bucket is full again, which keeps a token in
reserve for changes). Production does not use that: `Gossip` republishes by
its refresh interval and asks the pacer only about changes (`changed=True`), as
`bench.gossip_law` does; only tests/test_pacing.py drives the periodic mode.

Pure: no clock reads, no I/O. Times are floats in seconds from the caller's clock.
"""

from __future__ import annotations

import math

DEFAULT_INTERVAL = 1.0
DEFAULT_BUDGET = 200.0  # records per second, whole network
DEFAULT_BURST = 1.5


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def publish_interval(
    view_size: int,
    base_interval: float = DEFAULT_INTERVAL,
    budget: float = DEFAULT_BUDGET,
) -> float:
    """Seconds between a node's records: max(base_interval, (view_size + 1) / budget).

    `view_size` counts the peers in the node's view, not the node itself. With
    every node using this interval the network publishes at most `budget`
    records per second in the long run (plus the pacer's burst).
    """
    if view_size < 0:
        raise ValueError(f"view_size must be >= 0, got {view_size}")
    _check_positive("base_interval", base_interval)
    _check_positive("budget", budget)
    return max(base_interval, (view_size + 1) / budget)


class PublishPacer:
    """When to publish on change (and, unused by the node, periodically): on average at
    most once per interval.

    A token bucket of at most `burst` tokens, refilled at one token per
    current interval; every publish spends one. The first publish is due at
    once (the bucket starts full).

    - A change is due as soon as the bucket holds a token: at once after a
      quiet spell, and never more than one interval after the last publish.
    - A periodic publish is due when the bucket is full again: exactly one
      interval after the last publish when nothing changed, at most
      `burst` intervals after it otherwise.

    Over any window of W seconds at a constant interval the node publishes at
    most W / interval + burst times. When the interval changes (the view grows
    or shrinks), the refill since the last publish is counted at the interval
    given to the call. The caller passes `changed=True` while a change is
    waiting to be published, and calls `published` after each publish.
    """

    __slots__ = ("_burst", "_last", "_tokens")

    def __init__(self, burst: float = DEFAULT_BURST) -> None:
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be a finite number >= 1, got {burst!r}")
        self._burst = burst
        self._last: float | None = None  # time of the last publish
        self._tokens = burst  # tokens right after the last publish

    def due(self, now: float, interval: float, changed: bool) -> bool:
        """Whether to publish at `now`."""
        return self.next_due(now, interval, changed) <= now

    def next_due(self, now: float, interval: float, changed: bool) -> float:
        """Time of the next publish if nothing else changes; `now` when one is due."""
        self._check(now, interval)
        if self._last is None:
            return now
        wanted = 1.0 if changed else self._burst
        ready = self._last + max(0.0, wanted - self._tokens) * interval
        return max(now, ready)

    def published(self, now: float, interval: float) -> None:
        """Record a publish at `now`: spend one token."""
        self._check(now, interval)
        if self._last is not None:
            refill = (now - self._last) / interval
            self._tokens = min(self._burst, self._tokens + refill)
        self._tokens -= 1.0
        self._last = now

    def _check(self, now: float, interval: float) -> None:
        _check_positive("interval", interval)
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        if self._last is not None and now < self._last:
            raise ValueError(f"now={now} is before the last publish at {self._last}")
