"""Integration: gossip among 10+ real nodes in one process (p2p_node.testing)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
from beats import first_beat
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.pubsub.pubsub import Pubsub
from multiaddr import Multiaddr

from gossip import EventKind, PeerState, Rejection, encode_record
from p2p_node import NodeConfig
from p2p_node._config import GossipConfig
from p2p_node.testing import Swarm, edges, open_rogue, open_swarm
from scheduler import JobError

N = 10
TOPIC = "/p2p-node/default/records/1"


def alive_everywhere(swarm: Swarm, peer_id: str) -> bool:
    return any(peer_id in {p.peer_id for p in swarm[i].view.snapshot().alive()} for i in swarm.live)


@pytest.mark.parametrize("topology", ["full", "ring", "random"])
def test_topologies_are_connected_graphs(topology) -> None:
    links = edges(12, topology, degree=4, seed=1)
    assert _connected(links, set(range(12)))
    if topology == "ring":
        assert len(links) == 12


def _connected(links: set[tuple[int, int]], nodes: set[int]) -> bool:
    """Whether `nodes` form one component over the links among themselves."""
    start = min(nodes)
    reached, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for a, b in links:
            for x, y in ((a, b), (b, a)):
                if x == node and y in nodes and y not in reached:
                    reached.add(y)
                    frontier.append(y)
    return reached == nodes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_random_topology_cut_by_workers_or_halves_leaves_each_side_connected(
    groups, seed
) -> None:
    # A cut that leaves a node no link on its side measures that node, unheard
    # until the heal, more than the protocol (the 100/100 heal of bench.gossip).
    n = 200
    links = edges(n, "random", degree=4, seed=seed, groups=groups)
    assert 2 * len(links) / n == pytest.approx(4, abs=0.1)
    sides = [set(range(n // 2)), set(range(n // 2, n))]
    sides += [{i for i in range(n) if i % groups == w} for w in range(groups)]
    for side in sides:
        assert _connected(links, side)


async def test_ten_nodes_converge_and_views_carry_the_records() -> None:
    with trio.fail_after(60):
        async with open_swarm(N, topology="random", degree=4, seed=3) as swarm:
            await swarm.wait_converged()
            view = swarm[0].view.snapshot()
    other = view.peers[swarm[5].peer_id].record
    assert other.addrs and other.addrs[0].endswith(swarm[5].peer_id)
    assert {m.descriptor.id for m in other.models} == {m.id for m in swarm[5].models}
    assert other.capabilities.cpu_count >= 1 and other.interval == GossipConfig().refresh


async def test_a_killed_node_leaves_every_view() -> None:
    with trio.fail_after(60):
        async with open_swarm(N, topology="random", degree=4, seed=4) as swarm:
            await swarm.wait_converged()
            victim = swarm[7].peer_id
            await swarm.kill(7)
            for i in swarm.live:
                await swarm[i].view.wait_until(
                    lambda v: victim not in {p.peer_id for p in v.alive()}
                )
            assert not alive_everywhere(swarm, victim)


async def test_a_neighbours_lost_link_does_not_remove_a_peer_we_are_connected_to() -> None:
    with trio.fail_after(60):
        async with open_swarm(3, topology="full") as swarm:
            await swarm.wait_converged()
            second, third = swarm[1].peer_id, swarm[2].peer_id
            # Node 1 reports a lost link only once it carried a beat (records reach
            # it through node 0 as well, so the views converge without one).
            await first_beat(swarm[1], third)
            events = swarm[0].view.subscribe()
            await swarm.block(1, [third])  # only the link between nodes 1 and 2 drops

            def reported_gone(view) -> bool:  # type: ignore[no-untyped-def]
                record = view.peers[second].record
                return any(gone.peer_id == third for gone in record.departed)

            # Node 1 tells everyone that node 2 went; node 0 still holds its own link.
            await swarm[0].view.wait_until(reported_gone)
            seen = []
            while True:
                try:
                    seen.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
            known = swarm[0].view.snapshot().peers.get(third)
            still_connected = third in swarm[0].connected_peers()
    assert still_connected and known is not None and known.state is PeerState.ALIVE
    assert not [e for e in seen if e.peer_id == third and e.kind is not EventKind.UPDATED]


async def test_a_stall_shorter_than_the_ttl_kills_no_one() -> None:
    with trio.fail_after(60):
        async with open_swarm(N, topology="random", degree=4, seed=5) as swarm:
            await swarm.wait_converged()
            events = [swarm[i].view.subscribe() for i in swarm.live]
            stalled = swarm[2]
            # No beat for 0.5 s (plus up to an interval since the last) stays under
            # the ttl of 3 intervals.
            seq_before = stalled._seq
            swarm.stall(2, 0.5)
            for i in swarm.live:  # until every peer has the record it publishes after
                if i != 2:
                    await swarm[i].view.wait_until(
                        lambda v: v.peers[stalled.peer_id].record.seq > seq_before
                    )
    deaths = [
        (i, event)
        for i, channel in enumerate(events)
        for event in _drain(channel)
        if event.kind in (EventKind.LEFT, EventKind.SUSPECT)
    ]
    assert deaths == []


async def test_a_partition_splits_the_views_and_healing_reconverges() -> None:
    left, right = range(0, 5), range(5, 10)
    # Nodes with a link across the cut are reported departed at once; the others
    # leave the far side's views when their records expire, after 3 x refresh.
    quick = GossipConfig(refresh=2.0)
    with trio.fail_after(90):
        async with open_swarm(N, topology="random", degree=4, seed=6, gossip=quick) as swarm:
            await swarm.wait_converged()
            await swarm.partition([left, right])
            for side, other in ((left, right), (right, left)):
                gone = {swarm[j].peer_id for j in other}
                for i in side:
                    await swarm[i].view.wait_until(
                        lambda v, gone=gone: not gone & {p.peer_id for p in v.alive()}
                    )
            await swarm.heal()
            await swarm.wait_converged()


class _ConnectsFrom(INotifee):
    """Counts the connections a node's swarm adds with one peer."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.count = 0

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.count += str(conn.muxed_conn.peer_id) == self.peer_id

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


async def test_a_one_sided_block_holds_while_the_blocked_peer_redials() -> None:
    # Node 1 dialed node 0 (its bootstrap peer) and redials it whenever the link
    # drops, from a new port each time: node 0 refuses it at the handshake, by peer id.
    with trio.fail_after(60):
        async with open_swarm(2, topology="full") as swarm:
            await swarm.wait_converged()
            blocker, blocked = swarm[0], swarm[1]
            connects = _ConnectsFrom(blocked.peer_id)
            blocker._rpc.host.get_network().register_notifee(connects)
            await swarm.block(0, [blocked.peer_id])
            while swarm.blocklists[0].refused < 3:  # noqa: ASYNC110  # node 1 redials
                await trio.sleep(0.05)
            apart = (
                blocked.peer_id not in blocker.connected_peers()
                and blocker.peer_id not in blocked.connected_peers()
            )
            connects_while_blocked = connects.count
            await swarm.heal()
            # Node 1 redials. (Not "until the views are whole": a link cut before
            # its first beat is not reported, and node 0 may still hold node 1 alive.)
            while connects.count == connects_while_blocked:  # noqa: ASYNC110
                await trio.sleep(0.05)
            await swarm.wait_converged()  # node 1's record comes back by the sync on reconnecting
            healed = blocked.peer_id in blocker.connected_peers()
    assert apart
    assert connects_while_blocked == 0
    assert healed


async def test_a_peer_whose_dials_failed_is_dialed_again_as_soon_as_asked() -> None:
    """py-libp2p refuses for 60 s to dial a peer whose every address failed (its
    negative cache). Membership has its own backoff: a dial it asks for goes out."""
    with trio.fail_after(30):
        async with open_swarm(2, topology="full") as swarm:
            await swarm.wait_converged()
            dialer, other = swarm[1], swarm[0]
            await swarm.block(0, [dialer.peer_id])
            with pytest.raises(JobError):  # refused at the handshake: a failed dial
                await dialer.connect(other.addrs[0])
            await swarm.heal()
            await dialer.connect(other.addrs[0])
            assert other.peer_id in dialer.connected_peers()


async def test_membership_dials_peers_it_learns_from_records() -> None:
    """A ring (degree 2) whose nodes want 3 connections grows chords from the records."""
    base = NodeConfig(data_dir=Path("unused"), target_degree=3, shutdown_grace=1.0)
    with trio.fail_after(60):
        async with open_swarm(6, topology="ring", base=base) as swarm:
            await swarm.wait_converged()
            while not all(_degree(swarm, i) >= 3 for i in swarm.live):  # noqa: ASYNC110
                await trio.sleep(0.05)  # connections are not view events: poll them


def _degree(swarm: Swarm, i: int) -> int:
    nodes = {swarm[j].peer_id for j in swarm.live}
    return len(swarm[i].connected_peers() & nodes)


async def test_forged_replayed_oversize_and_garbage_records_are_rejected_and_counted() -> None:
    with trio.fail_after(60):
        async with open_swarm(3, topology="full") as swarm:
            await swarm.wait_converged()
            victim, honest = swarm[1], swarm[2]
            template = victim.make_record(1.0, ())
            async with open_rogue(swarm[0].addrs[0]) as (pubsub, rogue_id):
                await _published_once_subscribed(pubsub, swarm[0].peer_id)
                own = replace(template, peer_id=rogue_id, boot_id="rogue", models=())

                async def seen(seq: int) -> None:
                    await swarm[0].view.wait_until(
                        lambda v: rogue_id in v.peers and v.peers[rogue_id].record.seq == seq
                    )

                for data in (
                    encode_record(replace(template, seq=10**6)),  # forged: victim's id
                    b"\x93garbage",
                    b"\x00" * (20 * 1024),  # oversize
                    encode_record(replace(own, seq=5)),
                ):
                    await pubsub.publish(TOPIC, data)
                # Pubsub validates each message of a stream in a task of its own, so
                # order on the wire is no order of taking: the replay goes once its
                # newer record is in.
                await seen(5)
                await pubsub.publish(TOPIC, encode_record(replace(own, seq=3)))  # replayed
                await pubsub.publish(TOPIC, encode_record(replace(own, seq=9)))
                await seen(9)
                rejects = dict(swarm[0].gossip.rejects)
                victim_record = swarm[0].view.snapshot().peers[victim.peer_id].record
            # Honest records still flow afterwards.
            before = honest._seq
            honest.gossip.changed()
            await swarm[0].view.wait_until(lambda v: v.peers[honest.peer_id].record.seq > before)
    assert rejects.get(Rejection.FORGED, 0) >= 1
    assert rejects.get(Rejection.MALFORMED, 0) >= 1
    assert rejects.get(Rejection.OVERSIZE, 0) >= 1
    assert rejects.get(Rejection.REPLAYED, 0) >= 1
    assert victim_record.seq < 10**6  # the forgery never reached the view


FLOOD = 400


async def test_a_flood_of_forged_and_replayed_records_is_rejected_and_honest_ones_still_flow() -> (
    None
):
    with trio.fail_after(90):
        async with open_swarm(3, topology="full") as swarm:
            await swarm.wait_converged()
            target, victim, honest = swarm[0], swarm[1], swarm[2]
            events = target.view.subscribe()
            template = victim.make_record(1.0, ())
            async with open_rogue(target.addrs[0]) as (pubsub, rogue_id):
                await _published_once_subscribed(pubsub, target.peer_id)
                own = replace(template, peer_id=rogue_id, boot_id="rogue", models=())

                async def rogue_seen_at(seq: int) -> None:
                    await pubsub.publish(TOPIC, encode_record(replace(own, seq=seq)))
                    await target.view.wait_until(
                        lambda v: rogue_id in v.peers and v.peers[rogue_id].record.seq == seq
                    )

                await rogue_seen_at(1)
                before = honest._seq
                async with trio.open_nursery() as nursery:

                    async def flood() -> None:
                        for i in range(FLOOD):
                            forged = replace(template, seq=10**6 + i)  # the victim's id
                            await pubsub.publish(TOPIC, encode_record(forged))
                            await pubsub.publish(TOPIC, encode_record(replace(own, seq=1)))
                            await trio.sleep(0.005)  # 400 msg/s: twice the whole network budget

                    nursery.start_soon(flood)
                    honest.gossip.changed()  # an honest change, mid-flood
                    await target.view.wait_until(
                        lambda v: v.peers[honest.peer_id].record.seq > before
                    )
                # One stream from the rogue: its next record comes after the whole flood.
                await rogue_seen_at(2)
                rejects = dict(target.gossip.rejects)
                snapshot = target.view.snapshot()
    # The rogue's own stack drops what its outbound queue cannot hold, so not every
    # message of the flood arrives; every one that did was rejected.
    assert rejects[Rejection.FORGED] >= FLOOD // 4 and rejects[Rejection.REPLAYED] >= FLOOD // 4
    assert snapshot.peers[victim.peer_id].record.seq < 10**6  # no forgery got in
    kinds = {e.kind for e in _drain(events) if e.peer_id in (victim.peer_id, honest.peer_id)}
    assert EventKind.SUSPECT not in kinds and EventKind.LEFT not in kinds  # no false deaths


async def _published_once_subscribed(pubsub: Pubsub, peer_id: str) -> None:
    """Wait until the node's subscription to the topic has reached the rogue."""
    from libp2p.peer.id import ID

    target = ID.from_base58(peer_id)
    while target not in pubsub.peer_topics.get(TOPIC, set()):  # noqa: ASYNC110
        await trio.sleep(0.01)  # libp2p exposes no event for a peer's subscription


def _drain(channel: trio.MemoryReceiveChannel) -> list:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def test_the_state_enum_is_what_the_cli_prints() -> None:
    assert [str(s) for s in PeerState] == ["alive", "suspect"]
