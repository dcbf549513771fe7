"""Waiting for a link's first beat, for tests that cut a link and expect it reported.

A node reports a neighbour departed when their connection drops only if the
link had carried a beat (`Gossip.connection_lost`). A swarm can converge on
records gossiped through other nodes before a given link's first beat, so a
test that cuts a link right after converging must wait for that beat first.
"""

from __future__ import annotations

import trio

from p2p_node._node import Node


async def first_beat(node: Node, peer_id: str) -> None:
    """Until `node` has had a beat from `peer_id` on their link."""
    gossip = node.gossip
    beaten = trio.Event()
    heard = gossip.heard_from

    def hearing(beater: str) -> None:
        heard(beater)
        if beater == peer_id:
            beaten.set()

    gossip.heard_from = hearing  # type: ignore[method-assign]
    try:
        if peer_id not in gossip._beaten:
            await beaten.wait()
    finally:
        del gossip.heard_from  # the class's again
