"""PeerView: newer-only records, suspect/alive, expiry by ttl, departures, events."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gossip import (
    Capabilities,
    Departure,
    EventKind,
    Load,
    PeerRecord,
    PeerState,
    PeerView,
    ViewEvent,
    expire_forever,
)

CAPS = Capabilities(
    cpu_count=2, cpu_model="x", memory_mb=1024, gpus=(), providers=("CPUExecutionProvider",)
)
IDLE = Load(
    in_flight=0, queue_length=0, cpu_percent=0.0, memory_available_mb=512, gpu_utilization=()
)


def record(
    peer: str,
    seq: int,
    *,
    boot: str = "b1",
    at: float = 1000.0,
    interval: float = 1.0,
    departed: tuple[Departure, ...] = (),
) -> PeerRecord:
    return PeerRecord(
        peer_id=peer,
        boot_id=boot,
        seq=seq,
        issued_at=at,
        interval=interval,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",),
        capabilities=CAPS,
        models=(),
        load=IDLE,
        performance=(),
        departed=departed,
    )


def state(view: PeerView, peer: str) -> PeerState | None:
    known = view.snapshot().peers.get(peer)
    return known.state if known else None


@pytest.mark.parametrize(
    ("first", "second", "taken"),
    [
        (record("a", 1), record("a", 2), True),
        (record("a", 2), record("a", 2), False),
        (record("a", 3), record("a", 2), False),
        (record("a", 5, at=100.0), record("a", 1, boot="b2", at=200.0), True),
        (record("a", 5, at=200.0), record("a", 9, boot="b2", at=100.0), False),
    ],
    ids=["higher-seq", "same-seq", "lower-seq", "new-boot-later", "new-boot-earlier"],
)
def test_only_newer_records_are_taken(first, second, taken: bool) -> None:
    view = PeerView()
    assert view.apply(first, now=0.0)
    assert view.apply(second, now=1.0) is taken
    assert view.snapshot().peers["a"].record == (second if taken else first)


def test_a_disconnect_makes_a_peer_suspect_until_its_next_record() -> None:
    view = PeerView()
    view.apply(record("a", 1), now=0.0)
    view.apply(record("b", 1), now=0.0)
    view.suspect("a")
    assert state(view, "a") is PeerState.SUSPECT
    assert [p.peer_id for p in view.snapshot().alive()] == ["b"]
    view.apply(record("a", 2), now=0.5)
    assert state(view, "a") is PeerState.ALIVE


def test_a_peer_expires_after_ttl_factor_times_its_own_interval() -> None:
    view = PeerView(ttl_factor=3.0)
    view.apply(record("fast", 1, interval=1.0), now=10.0)
    view.apply(record("slow", 1, interval=5.0), now=10.0)
    assert view.next_expiry() == 13.0
    assert view.expire(now=12.999) == []
    assert view.expire(now=13.0) == ["fast"]
    assert view.expire(now=24.9) == []
    assert view.expire(now=25.0) == ["slow"]
    assert len(view.snapshot()) == 0


def test_a_replayed_record_does_not_revive_a_peer_that_left() -> None:
    view = PeerView()
    view.apply(record("a", 4), now=0.0)
    view.expire(now=100.0)
    assert not view.apply(record("a", 3), now=101.0)
    assert not view.apply(record("a", 4), now=101.0)
    assert view.apply(record("a", 5), now=101.0)


@pytest.mark.parametrize(
    ("departure", "dropped"),
    [
        (Departure("a", "b1", 3), True),
        (Departure("a", "b1", 7), True),
        (Departure("a", "b1", 2), False),  # the peer was heard from since
        (Departure("a", "other-boot", 3), False),
        (Departure("nobody", "b1", 3), False),
    ],
    ids=["same-seq", "later-seq", "older-seq", "other-boot", "unknown-peer"],
)
def test_a_departure_drops_a_peer_only_if_it_is_still_current(departure, dropped) -> None:
    view = PeerView()
    view.apply(record("a", 3), now=0.0)
    assert view.depart(departure.peer_id, departure.boot_id, departure.seq) is dropped
    assert ("a" not in view.snapshot().peers) is dropped


def test_a_suspect_peer_leaves_after_suspect_ttl_unless_a_record_comes() -> None:
    view = PeerView(suspect_ttl=3.0)
    view.apply(record("a", 1, interval=30.0), now=0.0)
    view.apply(record("b", 1, interval=30.0), now=0.0)
    view.suspect("a", now=10.0)
    view.suspect("b", now=10.0)
    view.apply(record("b", 2, interval=30.0), now=12.0)  # heard from again: alive
    assert view.expire(now=12.9) == []
    assert view.expire(now=13.0) == ["a"]
    assert view.snapshot().peers["b"].state is PeerState.ALIVE
    assert view.expire(now=89.0) == []  # b's own ttl: 3 x 30 s from its last record
    assert view.expire(now=102.0) == ["b"]


def test_without_a_time_or_a_suspect_ttl_a_suspect_peer_keeps_its_record_ttl() -> None:
    for view, now in ((PeerView(suspect_ttl=3.0), None), (PeerView(), 10.0)):
        view.apply(record("a", 1, interval=30.0), now=0.0)
        view.suspect("a", now=now)
        assert view.expire(now=89.0) == []
        assert view.expire(now=90.0) == ["a"]


def test_subscribers_see_every_transition_in_order() -> None:
    view = PeerView()
    events = view.subscribe()
    view.apply(record("a", 1), now=0.0)
    view.apply(record("a", 2), now=0.1)
    view.suspect("a")
    view.apply(record("a", 3), now=0.2)
    view.expire(now=10.0)
    seen = []
    while True:
        try:
            seen.append(events.receive_nowait())
        except trio.WouldBlock:
            break
    assert seen == [
        ViewEvent(EventKind.JOINED, "a"),
        ViewEvent(EventKind.UPDATED, "a"),
        ViewEvent(EventKind.SUSPECT, "a"),
        ViewEvent(EventKind.ALIVE, "a"),
        ViewEvent(EventKind.LEFT, "a"),
    ]


def test_snapshots_are_frozen() -> None:
    view = PeerView()
    view.apply(record("a", 1), now=0.0)
    before = view.snapshot()
    view.apply(record("b", 1), now=0.0)
    assert set(before.peers) == {"a"}
    with pytest.raises(TypeError):
        before.peers["c"] = before.peers["a"]  # type: ignore[index]


async def test_the_expiry_loop_drops_a_silent_peer_at_its_ttl(autojump_clock) -> None:
    view = PeerView(ttl_factor=3.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expire_forever, view, 1.0)
            start = trio.current_time()
            view.apply(record("a", 1, interval=1.0), now=start)
            await trio.sleep(2.5)
            assert "a" in view.snapshot().peers  # still within its ttl
            view.apply(record("a", 2, interval=1.0), now=trio.current_time())  # heard again
            await view.wait_until(lambda v: "a" not in v.peers)
            assert trio.current_time() - start == pytest.approx(2.5 + 3.0)
            nursery.cancel_scope.cancel()


async def test_wait_until_returns_at_the_first_matching_snapshot(autojump_clock) -> None:
    view = PeerView()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                for seq in range(1, 4):
                    await trio.sleep(1)
                    view.apply(record("a", seq), now=trio.current_time())

            nursery.start_soon(feed)
            seen = await view.wait_until(lambda v: "a" in v.peers and v.peers["a"].record.seq >= 2)
    assert seen.peers["a"].record.seq == 2
