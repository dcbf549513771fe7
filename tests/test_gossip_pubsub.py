"""What the node changes in py-libp2p's pubsub (`p2p_node._gossip`): its validation
cache keeps py-libp2p's behaviour (least recently used eviction, expiry by ttl)
with an OrderedDict for the order, and its per-peer queues hold more RPCs."""

from __future__ import annotations

import random

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import ValidationCache, ValidationResult

from p2p_node import _gossip
from p2p_node.testing import open_swarm


@pytest.mark.parametrize("seed", range(5))
def test_it_answers_as_py_libp2ps_cache_does(monkeypatch, seed) -> None:
    now = [1000.0]
    monkeypatch.setattr("time.time", lambda: now[0])
    rng = random.Random(seed)
    ours, theirs = _gossip._ValidationCache(10, 8), ValidationCache(10, 8)
    for _ in range(2000):
        msg_id = bytes([rng.randrange(20)])
        op = rng.random()
        if op < 0.4:
            result = ValidationResult(rng.random() < 0.5, now[0])
            ours.put(msg_id, result)
            theirs.put(msg_id, result)
        elif op < 0.9:
            assert ours.get(msg_id) == theirs.get(msg_id)
        elif op < 0.95:
            ours.clear_expired()
            theirs.clear_expired()
        else:
            now[0] += rng.uniform(0, 6)
        assert ours.cache == theirs.cache
        assert list(ours._order) == theirs.access_order


async def test_a_nodes_pubsub_uses_the_cache_and_roomy_queues() -> None:
    with trio.fail_after(30):
        async with open_swarm(2) as swarm:
            await swarm.wait_converged()
            pubsub = swarm[0].gossip._pubsub
            assert type(pubsub.validation_cache) is _gossip._ValidationCache
            queue = pubsub.peer_queues[ID.from_base58(swarm[1].peer_id)]
            assert queue._queue.max_size == _gossip.PEER_QUEUE_SIZE
            # Records still flow through it: a change reaches the other node.
            before = swarm[0]._seq
            swarm[0].gossip.changed()
            await swarm[1].view.wait_until(lambda v: v.peers[swarm[0].peer_id].record.seq > before)
