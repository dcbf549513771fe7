"""Work held by a frozen peer: alive to its kernel (its connections stay open) but
silent. Once the failure detector drops it from a view, what it holds is answered
elsewhere, long before it wakes: a coordinator's jobs, and a client's batch chunks.

The harness's stall silences a node's beats and records, and its busy blocks hold
what the node admitted: together, a node that neither answers nor drops the link.
"""

from __future__ import annotations

import multiaddr
import numpy as np
import onnxruntime as ort
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2p_node import Client, ExecutorConfig, JobError, NodeConfig, bundled_models_dir
from p2p_node._channel import MessageLimits
from p2p_node._host import new_libp2p_host, run_host
from p2p_node._messages import ModelsReply, ModelsRequest, Reply
from p2p_node._rpc import MODELS_PROTOCOL, open_rpc
from p2p_node._serve import Server
from p2p_node.testing import open_swarm
from scheduler import DistributionStrategy, ErrorCode, InferenceRequest

SVM = "digits-svm"
BASE = NodeConfig(
    data_dir=None,  # type: ignore[arg-type]  # open_swarm sets one per node
    shutdown_grace=1.0,
    target_degree=0,
    executor=ExecutorConfig(inline_below_ms=0),
)
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
STALL_S = 120.0  # far past every fail_after here: no answer can wait for its end


@pytest.fixture(scope="module")
def svm_labels(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What onnxruntime itself answers for the held-out digits."""
    model = bundled_models_dir() / SVM / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels: np.ndarray = session.run(["label"], {"input": digits[0]})[0]
    return labels


async def test_an_abandoned_peer_fails_the_calls_in_flight_at_once_and_hangs_them_up() -> None:
    held: list[ModelsRequest] = []
    hung_up: list[ModelsRequest] = []
    both_held, both_hung_up, release = trio.Event(), trio.Event(), trio.Event()

    async def handler(request: ModelsRequest, sender: str) -> Reply:
        if not release.is_set():
            held.append(request)
            if len(held) == 2:
                both_held.set()
            try:
                await release.wait()
            except trio.Cancelled:  # the caller reset the stream
                hung_up.append(request)
                if len(hung_up) == 2:
                    both_hung_up.set()
                raise
        return ModelsReply("answer", ())

    limits = MessageLimits(4096, 4096)
    server = Server(new_libp2p_host(create_new_key_pair()), limits, max_concurrent_inbound=8)
    server.serve(MODELS_PROTOCOL, ModelsRequest, handler)
    host = new_libp2p_host(create_new_key_pair())
    failures: list[JobError] = []
    with trio.fail_after(20):
        async with run_host(server.host, [LOOPBACK]), run_host(host, []):
            async with open_rpc(host, limits) as rpc:
                peer = await rpc.connect(server.host.get_addrs()[0], timeout=5)

                async def call() -> None:
                    try:
                        await rpc.call(peer, MODELS_PROTOCOL, ModelsRequest(), 60)
                    except JobError as error:
                        failures.append(error)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    nursery.start_soon(call)
                    await both_held.wait()
                    rpc.abandon(peer, "reported departed")
                await both_hung_up.wait()  # the server saw each stream reset
                release.set()  # it wakes up: it is called again, on new streams
                reply = await rpc.call(peer, MODELS_PROTOCOL, ModelsRequest(), 5)
    expected = (ErrorCode.PEER_UNREACHABLE, "reported departed", peer)
    assert [(e.code, e.message, e.peer) for e in failures] == [expected] * 2
    assert all(e.retryable for e in failures)
    assert reply == ModelsReply("answer", ())


async def test_a_job_held_by_a_stalled_peer_is_answered_by_another_once_it_is_dropped(
    digits, svm_labels
) -> None:
    x, _ = digits
    # Node 0 coordinates; nodes 1 and 2 serve the model.
    models = [frozenset({"cancer-logreg"}), frozenset({SVM}), frozenset({SVM})]
    robin = DistributionStrategy.ROUND_ROBIN
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=BASE) as swarm:
            await swarm.wait_converged()
            coordinator = swarm[0]
            first = coordinator.orchestrator.placement(SVM, robin).candidates[0].peer_id
            frozen = next(i for i in (1, 2) if swarm[i].peer_id == first)
            other = swarm[3 - frozen]
            async with Client.connect(coordinator.addrs[0]) as client:
                with swarm.busy(frozen):  # it holds the job...
                    async with trio.open_nursery() as nursery:
                        answers = []

                        async def submit() -> None:
                            answers.append(
                                await client.submit(
                                    SVM, {"input": x[:5]}, strategy=robin, job_id="held"
                                )
                            )

                        nursery.start_soon(submit)
                        await swarm[frozen].executor.wait_counters(lambda c: c.admitted == 1)
                        swarm.stall(frozen, STALL_S)  # ...and goes silent
                        stalled_at = trio.current_time()
                    answered_at = trio.current_time()
                    # The coordinator hung up on it: it drops the job unrun.
                    await swarm[frozen].executor.wait_counters(lambda c: c.cancelled_waiting == 1)
                    held = swarm[frozen].executor.counters
                    ran = other.executor.counters
                    gone = first not in coordinator.view.snapshot().peers
                    # Placed on it before the drop, sent after: refused, not held.
                    late = InferenceRequest(SVM, {"input": x[:1]}, 10.0)
                    with trio.fail_after(1), pytest.raises(JobError) as refused:
                        await coordinator.send(first, late, 10.0)
    (answer,) = answers
    assert answer.executor == other.peer_id
    assert np.array_equal(answer.outputs["label"], svm_labels[:5])
    assert gone  # answered after the coordinator dropped it, not at a timeout
    assert answered_at - stalled_at < swarm[0].gossip.ttl + 5.0
    # Once from the client's point of view: the stalled peer ran nothing, the other
    # ran it once, and the coordinator holds one answer for the id.
    assert held.admitted == 1 and held.completed == 0 and held.cancelled_waiting == 1
    assert ran.admitted == 1 and ran.completed == 1
    assert client.failovers == 0
    assert refused.value.code is ErrorCode.PEER_UNREACHABLE and refused.value.peer == first


async def test_a_batch_chunk_held_by_a_stalled_peer_is_redone_once_the_node_drops_it(
    digits, svm_labels
) -> None:
    x, _ = digits
    rows = 200
    with trio.fail_after(60):
        async with open_swarm(3, models=[frozenset({SVM})] * 3, base=BASE) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                batch = None
                with swarm.busy(2):  # node 2 holds its chunks...
                    async with trio.open_nursery() as nursery:

                        async def submit() -> None:
                            nonlocal batch
                            batch = await client.submit_batch(
                                SVM, {"input": x[:rows]}, batch_size=20, concurrency=6
                            )

                        nursery.start_soon(submit)
                        await swarm[2].executor.wait_counters(lambda c: c.admitted == 2)
                        swarm.stall(2, STALL_S)  # ...and goes silent
                        stalled_at = trio.current_time()
                    done_at = trio.current_time()
                    # The client hung up on it: it drops the chunks unrun.
                    await swarm[2].executor.wait_counters(lambda c: c.cancelled_waiting == 2)
                    held = swarm[2].executor.counters
    assert batch is not None
    assert swarm[2].peer_id not in batch.chunks_by_executor
    assert sum(batch.chunks_by_executor.values()) == batch.chunks == rows // 20
    assert np.array_equal(batch.outputs["label"], svm_labels[:rows])
    assert held.admitted == 2 and held.completed == 0
    assert done_at - stalled_at < swarm[0].gossip.ttl + 5.0
