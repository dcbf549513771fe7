"""The swarm harness with a network namespace per worker process: distinct
addresses, partitions that cut links, nothing left behind. Needs root and `ip`."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from gossip import PeerState, ViewSnapshot
from p2p_node import Node
from p2p_node._config import GossipConfig
from p2p_node._swarm_netns import leftovers, unavailable
from p2p_node._swarm_proc import crash
from p2p_node.testing import SwarmWorkerError, open_swarm

pytestmark = pytest.mark.skipif(
    (why := unavailable()) is not None, reason=why or "namespaces available"
)

FAST = GossipConfig(interval=0.5)


def _addrs(node: Node) -> list[str]:
    return node.addrs


def _alive_ids(node: Node) -> set[str]:
    return {p.peer_id for p in node.view.snapshot().alive()}


def _not_alive(peer_id: str, view: ViewSnapshot) -> bool:
    known = view.peers.get(peer_id)
    return known is None or known.state is not PeerState.ALIVE


async def _wait_not_alive(node: Node, peer_id: str) -> None:
    await node.view.wait_until(partial(_not_alive, peer_id))


async def test_workers_in_namespaces_have_their_own_addresses_and_partition_by_links() -> None:
    with trio.fail_after(50):
        async with open_swarm(4, processes=2, namespaces=True, gossip=FAST) as swarm:
            token = swarm.netns.token
            spaces, links = leftovers(token)
            assert len(spaces) == 2 and len(links) >= 3  # the bridge and two veth ends
            hosts = {(await swarm.run(i, _addrs))[0].split("/")[2] for i in range(4)}
            assert hosts == set(swarm.netns.ips)
            assert all(h.startswith("10.77.") for h in hosts)
            await swarm.wait_converged()
            ids = [swarm[i].peer_id for i in range(4)]

            assert swarm.owner == [0, 1, 0, 1]
            await swarm.partition([[0, 2], [1, 3]])  # one worker each side
            for i, j in [(0, 1), (0, 3), (2, 1), (3, 0)]:
                await swarm.run(i, _wait_not_alive, ids[j])
            assert await swarm.run(0, _alive_ids) == {ids[2]}
            await swarm.heal()
            await swarm.wait_converged()
    assert leftovers(token) == ([], [])


async def test_nothing_is_left_behind_after_a_crash() -> None:
    token = ""
    with trio.fail_after(30), pytest.raises(SwarmWorkerError, match="crash in a namespace"):
        async with open_swarm(2, processes=2, namespaces=True, gossip=FAST) as swarm:
            token = swarm.netns.token
            await swarm.workers[0].call(crash, "crash in a namespace")
            await trio.sleep_forever()
    assert token and leftovers(token) == ([], [])
