"""Membership over a fake network, in virtual time: kicks wake every loop at once,
failed dials back off with jitter, and peers found on the LAN are kept."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
import trio
import trio.testing

from gossip import PeerView
from p2p_node._membership import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    FORGET_FOUND_S,
    MAX_FOUND,
    Found,
    Membership,
)
from scheduler import ErrorCode, JobError


class FakeNetwork:
    """Peers, the addresses each answers on, and this node's connections to them."""

    def __init__(self) -> None:
        self.reachable: dict[str, set[str]] = {}  # peer id -> transport addresses
        self.connections: set[str] = set()
        self.dials: list[tuple[float, str]] = []  # (time, full address)
        self._dialed = trio.lowlevel.ParkingLot()

    async def dial(self, addr: str) -> str:
        await trio.lowlevel.checkpoint()
        self.dials.append((trio.current_time(), addr))
        self._dialed.unpark_all()
        transport, peer_id = addr.rsplit("/p2p/", 1)
        if transport not in self.reachable.get(peer_id, set()):
            raise JobError(ErrorCode.PEER_UNREACHABLE, f"no answer at {addr}")
        self.connections.add(peer_id)
        return peer_id

    def connected(self) -> frozenset[str]:
        return frozenset(self.connections)

    def dial_times(self, peer_id: str) -> list[float]:
        return [t for t, addr in self.dials if addr.endswith(f"/p2p/{peer_id}")]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds after a dial (what membership does next, it does
        before its next checkpoint)."""
        while not condition():
            await self._dialed.park()

    async def wait_for_dials(self, n: int) -> None:
        await self.wait_for(lambda: len(self.dials) >= n)


def addr(i: int) -> str:
    return f"/ip4/10.0.0.{i}/tcp/4001"


def membership(
    net: FakeNetwork,
    bootstrap: tuple[str, ...] = (),
    *,
    target_degree: int = 0,
    seed: int = 0,
    found: trio.MemoryReceiveChannel[Found] | None = None,
) -> Membership:
    return Membership(
        dial=net.dial,
        connected=net.connected,
        view=PeerView(),
        bootstrap=bootstrap,
        target_degree=target_degree,
        rng=random.Random(seed),
        found=found,
    )


async def test_every_kick_redials_a_dropped_peer_at_once(autojump_clock) -> None:
    """Two bootstrap peers and a degree to hold: three loops wait for kicks. Whichever
    peer drops, in whatever pattern of timeouts, its redial follows its kick at once
    (a shared Event that waiters replace stranded loops until their 10 s fallback)."""
    net = FakeNetwork()
    peers = {"A": addr(1), "B": addr(2)}
    for peer_id, transport in peers.items():
        net.reachable[peer_id] = {transport}
    member = membership(net, tuple(f"{a}/p2p/{p}" for p, a in peers.items()), target_degree=3)
    waits = []
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            await net.wait_for(lambda: net.connections == {"A", "B"})
            for i, gap in enumerate([0.3, 1.7, 2.5, 0.01, 4.2, 1.0, 3.3, 0.6, 5.1, 2.0]):
                await trio.sleep(gap)
                dropped = "AB"[i % 2]
                net.connections.discard(dropped)
                kicked_at = trio.current_time()
                member.kick()
                await net.wait_for(lambda d=dropped: d in net.connections)
                waits.append(net.dial_times(dropped)[-1] - kicked_at)
            nursery.cancel_scope.cancel()
    assert waits == [0.0] * len(waits)


async def test_failed_dials_back_off_exponentially_with_jitter(autojump_clock) -> None:
    gaps: dict[int, list[float]] = {}
    for seed in (1, 2):
        net = FakeNetwork()  # the peer never answers
        member = membership(net, (f"{addr(1)}/p2p/A",), seed=seed)
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member.run)
                await net.wait_for_dials(10)
                nursery.cancel_scope.cancel()
        times = net.dial_times("A")
        gaps[seed] = [b - a for a, b in itertools.pairwise(times)][:9]
    for seed, observed in gaps.items():
        for k, gap in enumerate(observed):
            delay = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**k)
            assert delay / 2 <= gap <= delay, (seed, k, gap)
    # Jittered: neither the plain doubling nor the same waits for two seeds.
    assert any(gap < min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**k) for k, gap in enumerate(gaps[1]))
    assert gaps[1] != gaps[2]


async def test_a_kick_cuts_a_backoff_short(autojump_clock) -> None:
    net = FakeNetwork()
    member = membership(net, (f"{addr(1)}/p2p/A",))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            await net.wait_for_dials(6)  # backing off seconds now
            net.reachable["A"] = {addr(1)}
            kicked_at = trio.current_time()
            member.unblock_all()  # kicks
            await net.wait_for(lambda: "A" in net.connections)
            nursery.cancel_scope.cancel()
    assert net.dial_times("A")[-1] == kicked_at


async def test_a_blocked_bootstrap_peer_is_not_dialed_until_unblocked(autojump_clock) -> None:
    net = FakeNetwork()
    net.reachable["A"] = {addr(1)}
    member = membership(net, (f"{addr(1)}/p2p/A",))
    member.block({"A"})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            await trio.sleep(30)
            assert net.dials == []
            member.unblock_all()
            await net.wait_for(lambda: "A" in net.connections)
            nursery.cancel_scope.cancel()
    assert net.dial_times("A") == [30.0]


async def test_peers_found_on_the_lan_are_dialed_and_kept(autojump_clock) -> None:
    net = FakeNetwork()
    net.reachable["A"] = {addr(1)}
    send, receive = trio.open_memory_channel[Found](16)
    member = membership(net, found=receive)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            # py-libp2p announces a node listening on 0.0.0.0 as such: not dialable.
            await send.send(("A", ("/ip4/0.0.0.0/tcp/4001", addr(9), addr(1))))
            await net.wait_for(lambda: "A" in net.connections)
            assert member.found_peers == {"A"}
            found_at = trio.current_time()
            await trio.sleep(7)
            net.connections.discard("A")
            kicked_at = trio.current_time()
            member.kick()
            # Back once both addresses are tried again: waiting for the first dial
            # alone let the test end between the two.
            await net.wait_for(lambda: "A" in net.connections)
            nursery.cancel_scope.cancel()
    assert net.dial_times("A")[-1] > found_at
    dialed = [a for _, a in net.dials]
    assert dialed == [f"{addr(9)}/p2p/A", f"{addr(1)}/p2p/A"] * 2  # each address in turn
    assert net.dial_times("A")[-2:] == [kicked_at, kicked_at]


async def test_a_found_peer_unreachable_for_long_is_forgotten_until_found_again(
    autojump_clock,
) -> None:
    net = FakeNetwork()
    send, receive = trio.open_memory_channel[Found](16)
    member = membership(net, found=receive)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            await send.send(("A", (addr(1),)))
            await net.wait_for(lambda: member.found_peers == {"A"})
            await net.wait_for(lambda: not member.found_peers)
            forgotten_at = trio.current_time()
            dials = len(net.dials)
            await trio.sleep(60)
            assert len(net.dials) == dials  # no longer dialed
            net.reachable["A"] = {addr(1)}
            await send.send(("A", (addr(1),)))
            await net.wait_for(lambda: "A" in net.connections)
            nursery.cancel_scope.cancel()
    assert FORGET_FOUND_S <= forgotten_at <= FORGET_FOUND_S + BACKOFF_CAP_S + 1


async def test_found_peers_are_bounded_and_bootstrap_peers_are_not_kept_twice(
    autojump_clock,
) -> None:
    net = FakeNetwork()
    send, receive = trio.open_memory_channel[Found](MAX_FOUND + 8)
    member = membership(net, (f"{addr(1)}/p2p/A",), found=receive)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.run)
            await send.send(("A", (addr(1),)))
            for i in range(MAX_FOUND + 5):
                await send.send((f"P{i}", (f"/ip4/10.1.{i // 250}.{i % 250}/tcp/1",)))
            await send.send(("Z", ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001")))
            await net.wait_for(lambda: len(member.found_peers) == MAX_FOUND)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert member.found_peers == {f"P{i}" for i in range(MAX_FOUND)}
    assert "Z" not in {a.rsplit("/p2p/", 1)[1] for _, a in net.dials}


async def test_jitter_comes_from_the_injected_rng(autojump_clock) -> None:
    """The same seed, the same waits: no randomness but the rng passed in."""
    runs = []
    for _ in range(2):
        net = FakeNetwork()
        member = membership(net, (f"{addr(1)}/p2p/A",), seed=3)
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member.run)
                await net.wait_for_dials(6)
                nursery.cancel_scope.cancel()
        times = net.dial_times("A")[:6]
        runs.append([t - times[0] for t in times])
    assert runs[0] == pytest.approx(runs[1])
