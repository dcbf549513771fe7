"""Publish pacing: the interval law and the token-bucket pacer, in virtual time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip._pacing import DEFAULT_BUDGET, PublishPacer, publish_interval


@dataclass(frozen=True)
class Run:
    publishes: list[float]
    waits: list[float]  # per change: seconds until the publish that carried it


def drive(
    pacer: PublishPacer,
    changes: Sequence[float],
    until: float,
    schedule: Sequence[tuple[float, float]] = ((0.0, 1.0),),
) -> Run:
    """Run the pacer as a node's publish loop does: sleep until the next publish is due,
    a change happens, or the interval changes; publish whenever `due` says so.

    `changes` are sorted times; `schedule` is sorted (start time, interval) pairs from 0.
    """
    publishes: list[float] = []
    waits: list[float] = []
    pending: list[float] = []
    next_change = 0
    segment = 0
    interval = schedule[0][1]
    t = 0.0
    while t <= until:
        while segment + 1 < len(schedule) and schedule[segment + 1][0] <= t:
            segment += 1
            interval = schedule[segment][1]
        while next_change < len(changes) and changes[next_change] <= t:
            pending.append(changes[next_change])
            next_change += 1
        if pacer.due(t, interval, bool(pending)):
            pacer.published(t, interval)
            publishes.append(t)
            waits.extend(t - c for c in pending)
            pending.clear()
        wake = pacer.next_due(t, interval, bool(pending))
        if not pending and next_change < len(changes):  # more changes don't move the wake
            wake = min(wake, changes[next_change])
        if segment + 1 < len(schedule):
            wake = min(wake, schedule[segment + 1][0])
        assert wake > t, "the loop must make progress"
        t = wake
    return Run(publishes, waits)


# -- publish_interval ---------------------------------------------------------


@pytest.mark.parametrize(
    ("view_size", "expected"),
    [
        pytest.param(0, 1.0, id="alone"),
        pytest.param(1, 1.0, id="two-nodes"),
        pytest.param(199, 1.0, id="exactly-at-budget"),
        pytest.param(200, 201 / 200, id="just-over-budget"),
        pytest.param(1000, 1001 / 200, id="1k"),
        pytest.param(10_000, 10_001 / 200, id="10k"),
    ],
)
def test_interval_with_default_budget(view_size: int, expected: float) -> None:
    interval = publish_interval(view_size)
    assert interval == pytest.approx(expected)
    assert (view_size + 1) / interval <= DEFAULT_BUDGET + 1e-9


@pytest.mark.parametrize(
    ("view_size", "base", "budget", "expected"),
    [
        pytest.param(9, 0.5, 100.0, 0.5, id="small-net-keeps-base"),
        pytest.param(99, 0.5, 100.0, 1.0, id="grows-past-base"),
        pytest.param(49, 2.0, 10.0, 5.0, id="slow-base-tight-budget"),
        pytest.param(0, 0.25, 1.0, 1.0, id="budget-below-one-node"),
    ],
)
def test_interval_with_custom_budget(
    view_size: int, base: float, budget: float, expected: float
) -> None:
    assert publish_interval(view_size, base, budget) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("view_size", "base", "budget"),
    [
        pytest.param(-1, 1.0, 200.0, id="negative-view"),
        pytest.param(0, 0.0, 200.0, id="zero-base"),
        pytest.param(0, -1.0, 200.0, id="negative-base"),
        pytest.param(0, math.inf, 200.0, id="infinite-base"),
        pytest.param(0, math.nan, 200.0, id="nan-base"),
        pytest.param(0, 1.0, 0.0, id="zero-budget"),
        pytest.param(0, 1.0, -5.0, id="negative-budget"),
        pytest.param(0, 1.0, math.inf, id="infinite-budget"),
        pytest.param(0, 1.0, math.nan, id="nan-budget"),
    ],
)
def test_interval_rejects_bad_arguments(view_size: int, base: float, budget: float) -> None:
    with pytest.raises(ValueError):
        publish_interval(view_size, base, budget)


# -- PublishPacer -------------------------------------------------------------


@pytest.mark.parametrize("burst", [0.5, 0.0, -1.0, math.inf, math.nan])
def test_pacer_rejects_bad_burst(burst: float) -> None:
    with pytest.raises(ValueError):
        PublishPacer(burst)


@pytest.mark.parametrize("interval", [0.0, -1.0, math.inf, math.nan])
def test_pacer_rejects_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError):
        PublishPacer().due(0.0, interval, False)


def test_pacer_rejects_time_going_backwards() -> None:
    pacer = PublishPacer()
    pacer.published(10.0, 1.0)
    with pytest.raises(ValueError, match="before the last publish"):
        pacer.due(9.0, 1.0, True)


def test_first_publish_is_immediate() -> None:
    pacer = PublishPacer()
    assert pacer.due(123.4, 50.0, changed=False)
    assert pacer.next_due(123.4, 50.0, changed=False) == 123.4


@pytest.mark.parametrize("interval", [0.5, 1.0, 2.5, 50.0])
def test_periodic_cadence_is_the_interval_when_nothing_changes(interval: float) -> None:
    run = drive(PublishPacer(), [], until=100 * interval, schedule=[(0.0, interval)])
    assert len(run.publishes) == 101
    assert np.diff(run.publishes) == pytest.approx(interval)


def test_change_after_idle_spell_is_immediate() -> None:
    pacer = PublishPacer(burst=2.0)
    pacer.published(0.0, 1.0)
    assert pacer.next_due(0.3, 1.0, changed=False) == 1.0
    assert pacer.due(0.3, 1.0, changed=True)
    run = drive(PublishPacer(burst=2.0), [10.5], until=20.0)
    assert run.waits == [0.0]
    assert 10.5 in run.publishes


def test_rare_changes_are_always_immediate() -> None:
    # One change every few intervals: the periodic publishes leave the reserve token alone.
    changes = [5.37 * k + 0.01 for k in range(1, 50)]
    run = drive(PublishPacer(burst=2.0), changes, until=300.0)
    assert run.waits == [0.0] * len(changes)
    assert len(run.publishes) <= 300 + 2


@pytest.mark.parametrize("interval", [1.0, 5.0])
def test_change_storm_stays_within_the_rate(interval: float) -> None:
    changes = [k * 0.001 for k in range(100_000)]  # every 1 ms for 100 s
    run = drive(PublishPacer(), changes, until=100.0, schedule=[(0.0, interval)])
    assert len(run.publishes) <= 100 / interval + 2
    assert len(run.publishes) >= 100 / interval  # the budget is used, not wasted
    assert max(run.waits) <= interval + 1e-9


def test_changes_wait_at_most_one_interval() -> None:
    changes = [0.05 * k for k in range(1, 400)]
    run = drive(PublishPacer(), changes, until=30.0, schedule=[(0.0, 3.0)])
    assert max(run.waits) <= 3.0 + 1e-9
    assert min(run.waits) == 0.0


def test_interval_grows_with_the_view() -> None:
    run = drive(PublishPacer(), [], until=40.0, schedule=[(0.0, 1.0), (10.0, 4.0)])
    before = [t for t in run.publishes if t <= 10.0]
    after = [t for t in run.publishes if t > 10.0]
    assert np.diff(before) == pytest.approx(1.0)
    assert after[0] <= 10.0 + 4.0
    assert np.diff(after) == pytest.approx(4.0)


def test_interval_shrinks_with_the_view() -> None:
    run = drive(PublishPacer(), [], until=20.0, schedule=[(0.0, 4.0), (10.0, 1.0)])
    after = [t for t in run.publishes if t >= 10.0]
    assert after[0] == 10.0  # the bucket refilled during the long interval
    assert np.diff(after) == pytest.approx(1.0)


def test_change_after_the_interval_grew_waits_at_most_the_new_interval() -> None:
    changes = [0.1 * k for k in range(1, 300)]
    run = drive(PublishPacer(), changes, until=30.0, schedule=[(0.0, 1.0), (5.0, 6.0)])
    assert max(run.waits) <= 6.0 + 1e-9
    assert len(run.publishes) <= 5 / 1.0 + 25 / 6.0 + 2 + 1


# -- properties -----------------------------------------------------------------

times = st.lists(st.floats(min_value=0.0, max_value=60.0), max_size=200).map(sorted)


@settings(max_examples=60, deadline=None)
@given(
    changes=times,
    interval=st.floats(min_value=0.2, max_value=10.0),
    burst=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
)
def test_any_window_holds_the_rate_and_no_change_waits_long(
    changes: list[float], interval: float, burst: float
) -> None:
    run = drive(PublishPacer(burst), changes, until=60.0, schedule=[(0.0, interval)])
    p = np.array(run.publishes)
    # Publishes i..j (inclusive) span p[j] - p[i]: at most span / interval + burst of them.
    i, j = np.triu_indices(len(p))
    assert np.all(j - i + 1 <= (p[j] - p[i]) / interval + burst + 1e-6)
    assert max(run.waits, default=0.0) <= interval * (1 + 1e-9)
    assert len(run.waits) == sum(c <= p[-1] for c in changes)
    # Liveness: a record at least every `burst` intervals, so ttl = 3 x interval holds.
    assert np.all(np.diff(p) <= burst * interval * (1 + 1e-9))


@settings(max_examples=60, deadline=None)
@given(
    changes=times,
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.5, max_value=20.0), st.floats(min_value=0.2, max_value=8.0)
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_long_run_bound_under_a_changing_interval(
    changes: list[float], steps: list[tuple[float, float]]
) -> None:
    schedule: list[tuple[float, float]] = []
    start = 0.0
    for length, interval in steps:
        schedule.append((start, interval))
        start += length
    intervals = [iv for _, iv in schedule]
    run = drive(PublishPacer(), changes, until=60.0, schedule=schedule)
    assert len(run.publishes) <= 60.0 / min(intervals) + 2 + 1e-6
    assert max(run.waits, default=0.0) <= max(intervals) * (1 + 1e-9)


def test_the_default_burst_bounds_silence_and_change_delay_by_fractions_of_an_interval() -> None:
    """Default burst 1.5: never silent past 1.5 intervals (half the ttl of 3), even in a
    change storm; an isolated change waits at most half an interval, and none after
    half an interval of quiet."""
    storm = drive(PublishPacer(), [0.37 * k for k in range(1, 300)], until=120.0)
    gaps = [b - a for a, b in zip(storm.publishes, storm.publishes[1:], strict=False)]
    assert max(gaps) <= 1.5 + 1e-9
    isolated = drive(PublishPacer(), [2.3 * k + 0.1 for k in range(1, 40)], until=100.0)
    assert max(isolated.waits) <= 0.5 + 1e-9
    pacer = PublishPacer()
    pacer.published(0.0, 1.0)
    assert not pacer.due(0.3, 1.0, changed=True)
    assert pacer.due(0.5, 1.0, changed=True)


def test_as_the_node_paces_changes_a_change_waits_at_most_one_interval() -> None:
    """Gossip asks only about changes (`changed=True`) and republishes by its refresh
    itself: a change after an interval of quiet goes at once, one right after a
    full-bucket publish waits half an interval, and in a storm one interval."""
    pacer = PublishPacer()
    assert pacer.due(0.0, 1.0, changed=True)
    pacer.published(0.0, 1.0)
    assert pacer.next_due(0.0, 1.0, changed=True) == 0.5
    pacer.published(0.5, 1.0)
    assert pacer.next_due(0.5, 1.0, changed=True) == 1.5
    pacer.published(1.5, 1.0)
    assert not pacer.due(2.4, 1.0, changed=True)
    assert pacer.due(2.5, 1.0, changed=True)
