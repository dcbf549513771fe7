"""A batch's chunks pulled by its peers: the queue and its failure rules in virtual
time (pure logic, with peers that are functions), then real nodes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import trio
import trio.testing

from p2p_node import Client, ExecutorConfig, NodeConfig, bundled_models_dir
from p2p_node._batch import MAX_OVERLOADED_WAITS, BatchRun, row_count, spread
from p2p_node.testing import open_swarm
from scheduler import ErrorCode, InferenceResult, JobError

CHUNKS = 12


def answer(chunk: int, peer: str) -> InferenceResult:
    return InferenceResult("job", "m", {"y": np.array([chunk])}, peer, 0.0, 1.0)


class Peers:
    """Peers that take `seconds[peer]` per chunk, and fail as `fails` says:
    fails[peer] = (after how many chunks, the error)."""

    def __init__(
        self,
        seconds: dict[str, float],
        fails: dict[str, tuple[int, JobError]] | None = None,
    ) -> None:
        self.seconds = seconds
        self.fails = fails or {}
        self.ran: dict[str, list[int]] = {peer: [] for peer in seconds}
        self.sent: list[tuple[str, int]] = []

    async def run_on(self, peer: str, chunk: int) -> InferenceResult:
        self.sent.append((peer, chunk))
        after, error = self.fails.get(peer, (10**9, JobError(ErrorCode.INTERNAL, "")))
        if len(self.ran[peer]) >= after:
            await trio.sleep(self.seconds[peer] / 2)
            raise error
        await trio.sleep(self.seconds[peer])
        self.ran[peer].append(chunk)
        return answer(chunk, peer)


class Fallback:
    def __init__(self, error: JobError | None = None) -> None:
        self.ran: list[int] = []
        self.error = error

    async def __call__(self, chunk: int) -> InferenceResult:
        await trio.sleep(1.0)
        if self.error:
            raise self.error
        self.ran.append(chunk)
        return answer(chunk, "node")


async def run_batch(
    peers: Peers, slots: dict[str, int], fallback: Fallback | None = None
) -> tuple[dict[int, InferenceResult], BatchRun]:
    results: dict[int, InferenceResult] = {}

    def answered(chunk: int, result: InferenceResult) -> None:
        assert chunk not in results, f"chunk {chunk} answered twice"
        results[chunk] = result

    batch = BatchRun(CHUNKS, peers.run_on, fallback or Fallback(), answered)
    with trio.fail_after(1000):
        await batch.run(slots, fallback_slots=2)
    return results, batch


async def test_every_chunk_is_answered_once_and_a_faster_peer_takes_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peers = Peers({"fast": 1.0, "slow": 3.0})
    results, batch = await run_batch(peers, {"fast": 1, "slow": 1})
    assert sorted(results) == list(range(CHUNKS))
    assert all(results[c].outputs["y"][0] == c for c in results)
    assert len(peers.ran["fast"]) == 9 and len(peers.ran["slow"]) == 3
    assert batch.left == {}


async def test_a_chunk_whose_peer_dies_is_redone_by_another_and_the_peer_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = JobError(ErrorCode.PEER_UNREACHABLE, "connection reset", peer="b")
    peers = Peers({"a": 1.0, "b": 1.0}, fails={"b": (2, gone)})
    results, batch = await run_batch(peers, {"a": 2, "b": 2})
    assert sorted(results) == list(range(CHUNKS))
    assert batch.left == {"b": gone}
    # b answered two chunks, then failed both of the chunks it held; a redid them
    assert len(peers.ran["b"]) == 2 and len(peers.ran["a"]) == CHUNKS - 2
    failed_at_b = [c for p, c in peers.sent if p == "b" and c not in peers.ran["b"]]
    assert failed_at_b and set(failed_at_b) <= set(peers.ran["a"])


async def test_when_every_peer_has_left_the_node_runs_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = JobError(ErrorCode.UNAUTHORIZED, "not on the allowlist", peer="a")
    peers = Peers({"a": 1.0}, fails={"a": (3, refused)})
    fallback = Fallback()
    results, batch = await run_batch(peers, {"a": 1}, fallback)
    assert sorted(results) == list(range(CHUNKS))
    assert peers.ran["a"] == [0, 1, 2] and sorted(fallback.ran) == list(range(3, CHUNKS))
    assert batch.left == {"a": refused}


async def test_an_error_about_the_request_ends_the_batch_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bad = JobError(ErrorCode.INVALID_INPUT, "expected 64 columns")
    peers = Peers({"a": 1.0, "b": 1.0}, fails={"a": (1, bad)})
    fallback = Fallback()
    with pytest.raises(JobError) as caught:
        await run_batch(peers, {"a": 1, "b": 1}, fallback)
    assert caught.value is bad
    # nothing was sent after the failure (at t=1.5), and the node was never asked
    assert len(peers.sent) == 4 and fallback.ran == []


async def test_the_fallbacks_error_ends_the_batch(autojump_clock: trio.testing.MockClock) -> None:
    gone = JobError(ErrorCode.PEER_UNREACHABLE, "no route", peer="a")
    no_peer = JobError(ErrorCode.NO_CAPABLE_PEER, "nobody serves m")
    with pytest.raises(JobError) as caught:
        await run_batch(Peers({"a": 1.0}, fails={"a": (0, gone)}), {"a": 1}, Fallback(no_peer))
    assert caught.value is no_peer


async def test_an_overloaded_peer_is_waited_for_as_asked_then_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = JobError(ErrorCode.OVERLOADED, "over its rate", peer="a", retry_after=5.0)
    peers = Peers({"a": 1.0}, fails={"a": (1, busy)})
    fallback = Fallback()
    started = trio.current_time()
    results, batch = await run_batch(peers, {"a": 1}, fallback)
    waited = trio.current_time() - started
    assert sorted(results) == list(range(CHUNKS)) and batch.left == {"a": busy}
    tries_at_a = [c for p, c in peers.sent if p == "a"]
    assert tries_at_a == [0] + [1] * (MAX_OVERLOADED_WAITS + 1)
    assert waited >= 1.0 + MAX_OVERLOADED_WAITS * 5.0


async def test_a_slot_with_nothing_to_take_is_woken_when_a_chunk_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = JobError(ErrorCode.PEER_UNREACHABLE, "connection reset", peer="slow")
    # fast runs the other 11 chunks by t=11 and then waits; slow fails its chunk
    # at t=15, which fast must take up.
    peers = Peers({"fast": 1.0, "slow": 30.0}, fails={"slow": (0, gone)})
    results, batch = await run_batch(peers, {"fast": 1, "slow": 1})
    assert sorted(results) == list(range(CHUNKS)) and batch.left == {"slow": gone}
    (failed,) = [chunk for peer, chunk in peers.sent if peer == "slow"]
    assert peers.ran["slow"] == [] and peers.ran["fast"][-1] == failed
    assert trio.current_time() == pytest.approx(16.0)


async def test_a_peer_asking_to_wait_does_not_hold_up_a_finished_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = JobError(ErrorCode.OVERLOADED, "queue full", peer="b", retry_after=100.0)
    peers = Peers({"a": 1.0, "b": 1.0}, fails={"b": (3, busy)})
    started = trio.current_time()
    results, batch = await run_batch(peers, {"a": 1, "b": 1})
    assert sorted(results) == list(range(CHUNKS)) and batch.left == {}
    assert trio.current_time() - started < 10.0  # not 100 s, nor the 5 s cap on top


@pytest.mark.parametrize(
    ("concurrency", "peers", "expected"),
    [
        (4, ["a", "b"], {"a": 2, "b": 2}),
        (5, ["a", "b"], {"a": 3, "b": 2}),
        (2, ["a", "b", "c"], {"a": 1, "b": 1}),
        (0, ["a"], {"a": 1}),
        (8, [], {}),
    ],
)
def test_spread(concurrency: int, peers: list[str], expected: dict[str, int]) -> None:
    assert spread(concurrency, peers) == expected


# --- real nodes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "batch_size", "says"),
    [
        pytest.param({"a": np.zeros((5, 2))}, 0, "batch size must be >= 1, got 0", id="size-0"),
        pytest.param({"a": np.zeros((0, 2))}, 4, "at least one row", id="no-rows"),
        pytest.param({"a": np.zeros((5, 2)), "b": np.zeros((4, 2))}, 2, "[4, 5]", id="uneven-rows"),
        pytest.param({"a": np.float32(1.0)}, 2, "same number of rows", id="scalar"),
    ],
)
def test_a_batch_that_cannot_be_split_is_invalid_input(inputs, batch_size, says) -> None:
    with pytest.raises(JobError) as caught:
        row_count(inputs, batch_size)
    assert caught.value.code is ErrorCode.INVALID_INPUT and says in str(caught.value)


def test_a_batch_counts_the_rows_its_inputs_share() -> None:
    assert row_count({"a": np.zeros((7, 3)), "b": np.zeros(7)}, batch_size=3) == 7


SVM = "digits-svm"
BASE = NodeConfig(
    data_dir=None,  # type: ignore[arg-type]  # open_swarm sets one per node
    shutdown_grace=1.0,
    target_degree=0,
    executor=ExecutorConfig(inline_below_ms=0),
)


@pytest.fixture(scope="module")
def svm_labels(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What onnxruntime itself answers for the held-out digits."""
    model = bundled_models_dir() / SVM / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels: np.ndarray = session.run(["label"], {"input": digits[0]})[0]
    return labels


async def test_a_batch_goes_straight_to_every_serving_peer(digits, svm_labels) -> None:
    x, _ = digits
    with trio.fail_after(60):
        async with open_swarm(3, models=[frozenset({SVM})] * 3, base=BASE) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                batch = await client.submit_batch(SVM, {"input": x}, batch_size=20, concurrency=6)
            coordinated = len(swarm[0].jobs)
    assert np.array_equal(batch.outputs["label"], svm_labels)
    assert set(batch.chunks_by_executor) == {node.peer_id for node in swarm.nodes}
    assert sum(batch.chunks_by_executor.values()) == batch.chunks == 27
    assert coordinated == 0  # the entry node forwarded nothing: every chunk went straight


async def test_a_batch_and_a_forwarded_job_answer_only_the_outputs_asked_for(
    digits, svm_labels
) -> None:
    x, _ = digits
    models = [frozenset({"digits-mlp"}), frozenset({SVM}), frozenset({SVM})]
    with trio.fail_after(60):
        async with open_swarm(3, models=models, base=BASE) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                batch = await client.submit_batch(
                    SVM, {"input": x}, batch_size=100, outputs=("label",)
                )
                forwarded = await client.submit(SVM, {"input": x}, outputs=("label",))
    assert list(batch.outputs) == ["label"] and list(forwarded.outputs) == ["label"]
    assert np.array_equal(batch.outputs["label"], svm_labels)
    assert np.array_equal(forwarded.outputs["label"], svm_labels)
    assert forwarded.executor != swarm[0].peer_id  # node 0 does not serve it


async def test_a_batch_chunk_whose_peer_dies_is_redone_elsewhere(digits, svm_labels) -> None:
    x, _ = digits
    with trio.fail_after(60):
        async with open_swarm(3, models=[frozenset({SVM})] * 3, base=BASE) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with trio.open_nursery() as nursery:
                    with swarm.busy(2):  # node 2 holds its chunks...

                        async def submit() -> None:
                            nonlocal batch
                            batch = await client.submit_batch(
                                SVM, {"input": x}, batch_size=20, concurrency=6
                            )

                        batch = None
                        nursery.start_soon(submit)
                        await swarm[2].executor.wait_counters(lambda c: c.admitted == 2)
                        await swarm.kill(2)  # ...when it dies
    assert batch is not None
    assert np.array_equal(batch.outputs["label"], svm_labels)
    assert swarm[2].peer_id not in batch.chunks_by_executor
    assert sum(batch.chunks_by_executor.values()) == 27
