"""The swarm harness across worker processes: real nodes in 2 processes, driven
from the test's trio loop (p2p_node.testing.open_swarm(processes=2))."""

from __future__ import annotations

import os

import pytest
import trio

from gossip import PeerState, ViewSnapshot
from p2p_node import Node
from p2p_node._config import GossipConfig
from p2p_node._swarm_proc import crash
from p2p_node.testing import (
    NodeHandle,
    ProcessSwarm,
    SwarmWorkerError,
    open_swarm,
    worker_of_node,
)

FAST = GossipConfig(interval=0.5)


def _pid(node: Node) -> int:
    return os.getpid()


def _alive_ids(node: Node) -> set[str]:
    return {p.peer_id for p in node.view.snapshot().alive()}


def _not_alive(peer_id: str, view: ViewSnapshot) -> bool:
    known = view.peers.get(peer_id)
    return known is None or known.state is not PeerState.ALIVE


async def _wait_not_alive(node: Node, peer_id: str) -> None:
    from functools import partial

    await node.view.wait_until(partial(_not_alive, peer_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_nodes_in_two_processes_converge_lose_a_killed_node_and_heal() -> None:
    with trio.fail_after(50):
        async with open_swarm(6, processes=2, gossip=FAST) as swarm:
            assert isinstance(swarm, ProcessSwarm)
            assert all(isinstance(swarm[i], NodeHandle) for i in range(6))
            pids = {await swarm.run(i, _pid) for i in range(6)}
            assert len(pids) == 2 and os.getpid() not in pids
            await swarm.wait_converged()
            ids = [swarm[i].peer_id for i in range(6)]
            assert await swarm.run(0, _alive_ids) == set(ids[1:])

            await swarm.kill(5)
            for i in range(5):
                await swarm.run(i, _wait_not_alive, ids[5])
            await swarm.wait_converged()

            await swarm.partition([range(0, 3), range(3, 5)])
            for i in range(3):
                for j in range(3, 5):
                    await swarm.run(i, _wait_not_alive, ids[j])
            assert await swarm.run(0, _alive_ids) == set(ids[1:3])
            await swarm.heal()
            await swarm.wait_converged()
            assert await swarm.run(4, _alive_ids) == set(ids[:4])
            workers = [w.process.pid for w in swarm.workers]
    assert not any(_alive(pid) for pid in workers)


async def test_a_worker_that_crashes_fails_the_swarm_with_its_traceback() -> None:
    with trio.fail_after(30), pytest.raises(SwarmWorkerError, match="boom in the worker"):
        async with open_swarm(4, processes=2, gossip=FAST) as swarm:
            workers = [w.process.pid for w in swarm.workers]
            await swarm.workers[1].call(crash, "boom in the worker")
            await trio.sleep_forever()  # the crash cancels this
    assert not any(_alive(pid) for pid in workers)


async def test_a_worker_that_dies_fails_the_swarm() -> None:
    with trio.fail_after(30), pytest.raises(SwarmWorkerError, match="exited"):
        async with open_swarm(4, processes=2, gossip=FAST) as swarm:
            swarm.workers[0].process.kill()
            await swarm.wait_converged()  # would hang on the dead worker's nodes


def test_nodes_take_workers_in_turn() -> None:
    # Each worker holds old nodes (the hubs of a random topology) and new.
    assert [worker_of_node(i, 2) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [worker_of_node(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
