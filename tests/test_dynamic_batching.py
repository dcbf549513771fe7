"""Dynamic batching: requests queued together for one model share one onnxruntime run.

Most tests hold the executor's only worker slot while requests queue, so that
which requests merge is decided, not raced; then they compare each answer with
the same request run by an executor that never merges.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from onnx import TensorProto, helper, numpy_helper

from gossip import ModelDescriptor, TensorSpec
from p2p_node import ErrorCode, ExecutorConfig, JobError, bundled_models_dir
from p2p_node._batching import (
    COMPANY_EXPECTED,
    BatchPolicy,
    Lane,
    Request,
    execute,
    mixes_rows,
    taken_along,
)
from p2p_node._executor import Execution, Executor, load_model
from p2p_node._repository import ModelCard, RepositoryError, read_model_card, read_repository

# The tensor models: the text model (MiniLM) has its own test below.
BUNDLED = sorted(c.id for c in read_repository(bundled_models_dir()) if c.text is None)
# Threads off the event loop's: a held slot holds every request back.
HELD = ExecutorConfig(workers=1, inline_below_ms=0)


def card(model_id: str, **changes: Any) -> ModelCard:
    (found,) = read_repository(bundled_models_dir(), frozenset({model_id}))
    return replace(found, **changes)


def heldout(model_id: str) -> np.ndarray:
    name = "digits.npz" if model_id.startswith("digits") else "cancer.npz"
    return np.load(bundled_models_dir() / "heldout" / name)["x"]


def executor(cards: Sequence[ModelCard], config: ExecutorConfig = HELD, **kw: Any) -> Executor:
    return Executor.from_cards(cards, config, limiter=trio.CapacityLimiter(config.workers), **kw)


Inputs = dict[str, np.ndarray]


async def run_held(
    ex: Executor, model_id: str, requests: Sequence[tuple[Inputs, Sequence[str]]]
) -> list[Execution]:
    """Queue every request while the only worker slot is held, then let them run."""
    results: list[Execution | None] = [None] * len(requests)

    async def one(i: int) -> None:
        inputs, outputs = requests[i]
        results[i] = await ex.run(model_id, inputs, outputs)

    async with trio.open_nursery() as nursery:
        async with ex.limiter:
            for i in range(len(requests)):
                nursery.start_soon(one, i)
            await ex.wait_counters(lambda c: c.admitted == len(requests))
            await trio.testing.wait_all_tasks_blocked()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


async def run_alone(
    model_id: str, cards: Sequence[ModelCard], requests: Sequence[tuple[Inputs, Sequence[str]]]
) -> list[Execution]:
    ex = executor(cards, batching=False)
    return [await ex.run(model_id, inputs, outputs) for inputs, outputs in requests]


def assert_same(merged: Execution, alone: Execution) -> None:
    assert list(merged.outputs) == list(alone.outputs)
    for name, want in alone.outputs.items():
        got = merged.outputs[name]
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.dtype.kind == "f":
            # A batched GEMM may round the last bit differently (logreg, svm: < 1e-6).
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)


# --- merged runs answer as unmerged runs do ------------------------------------------


@pytest.mark.parametrize("model_id", BUNDLED)
async def test_merged_results_equal_unmerged_results_row_for_row(model_id: str) -> None:
    x = heldout(model_id)
    rows = [(0, 1), (1, 4), (4, 5), (5, 12), (12, 13), (13, 40)]  # 1 to 27 rows each
    requests = [({"input": x[a:b]}, ()) for a, b in rows]
    cards = [card(model_id)]
    ex = executor(cards)
    with trio.fail_after(30):
        merged = await run_held(ex, model_id, requests)
        alone = await run_alone(model_id, cards, requests)
    for m, a in zip(merged, alone, strict=True):
        assert_same(m, a)
    assert (ex.runs, ex.merged, ex.counters.completed) == (1, 6, 6)
    assert len({m.compute_ms for m in merged}) == 1  # the shared run's time, for each
    assert all(m.queue_ms >= 0 for m in merged)
    assert ex.in_flight == ex.running == ex.queue_length == 0


async def test_requests_asking_for_different_outputs_share_a_run(digits) -> None:
    x, _ = digits
    wanted: list[Sequence[str]] = [("label",), ("probabilities", "label"), (), ("probabilities",)]
    requests = [({"input": x[i : i + 2]}, w) for i, w in enumerate(wanted)]
    cards = [card("digits-mlp")]
    ex = executor(cards)
    with trio.fail_after(30):
        merged = await run_held(ex, "digits-mlp", requests)
        alone = await run_alone("digits-mlp", cards, requests)
    for m, a, w in zip(merged, alone, wanted, strict=True):
        assert tuple(m.outputs) == (tuple(w) or ("label", "probabilities"))
        assert_same(m, a)
    assert ex.runs == 1


async def test_concurrent_requests_on_an_idle_node_merge_without_holding_anything(digits) -> None:
    x, y = digits
    ex = executor([card("digits-mlp")], ExecutorConfig(queue_limit=64))
    labels: dict[int, int] = {}

    async def one(i: int) -> None:
        labels[i] = int((await ex.run("digits-mlp", {"input": x[i : i + 1]})).outputs["label"][0])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
    assert np.mean([labels[i] == y[i] for i in range(32)]) > 0.9
    assert ex.counters.completed == 32 and ex.runs < 32


async def test_with_batching_off_every_request_is_its_own_run(digits) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp")], batching=False)
    with trio.fail_after(30):
        await run_held(ex, "digits-mlp", [({"input": x[i : i + 1]}, ()) for i in range(5)])
    assert (ex.runs, ex.merged) == (5, 0)
    assert not ex.batch_policy("digits-mlp").merges


# --- what never merges -----------------------------------------------------------------

V = helper.make_tensor_value_info


def onnx_model(
    tmp_path: Path,
    model_id: str,
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    inits: Sequence[np.ndarray] = (),
    toml: str = "",
) -> ModelCard:
    """A tiny hand-built model in its own repository directory."""
    graph = helper.make_graph(
        nodes,
        model_id,
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(a, f"init{i}") for i, a in enumerate(inits)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = tmp_path / model_id
    directory.mkdir()
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    (directory / "model.toml").write_text(
        f'id = "{model_id}"\nversion = "1"\ntask_type = "test"\nmax_input_length = 4\n'
        f"accuracy = 1.0\ncost = 1.0\n{toml}"
    )
    return read_model_card(directory)


def fixed_batch_model(tmp_path: Path) -> ModelCard:
    """y = -x for x of shape [1, 4]: a fixed batch of one."""
    neg = helper.make_node("Neg", ["x"], ["y"])
    return onnx_model(
        tmp_path,
        "fixed",
        [neg],
        [V("x", TensorProto.FLOAT, [1, 4])],
        [V("y", TensorProto.FLOAT, [1, 4])],
    )


def quantizing_model(tmp_path: Path, model_id: str = "quantizing") -> ModelCard:
    """y = dequantize(quantize(x)), x [N, 4], with the scale taken from all of x: as
    onnxruntime's quantize_dynamic makes int8 models (the bundled MiniLM)."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
    ]
    return onnx_model(
        tmp_path,
        model_id,
        nodes,
        [V("x", TensorProto.FLOAT, ["N", 4])],
        [V("y", TensorProto.FLOAT, ["N", 4])],
    )


def spread_rows(count: int) -> list[np.ndarray]:
    """Rows of very different ranges: quantized together, the small ones lose detail."""
    return [np.array([[0.0, 0.1, 0.2, 0.3]], "f4") * 10**i for i in range(count)]


def test_a_dynamically_quantized_model_would_answer_differently_merged(tmp_path: Path) -> None:
    model = load_model(quantizing_model(tmp_path), ExecutorConfig())
    rows = spread_rows(3)
    (merged,) = model.session.run(None, {"x": np.concatenate(rows)})
    alone = [model.session.run(None, {"x": r})[0] for r in rows]
    assert not np.allclose(merged[:1], alone[0], atol=1e-3)  # why it must never merge
    assert model.mixes_rows


@pytest.mark.parametrize("which", ["fixed-batch-1", "max_batch_rows-1", "dynamic-quantization"])
async def test_a_model_that_cannot_stack_is_never_merged(tmp_path: Path, which: str) -> None:
    if which == "fixed-batch-1":
        model_card, requests = (
            fixed_batch_model(tmp_path),
            [np.full((1, 4), i, "f4") for i in range(5)],
        )
    elif which == "dynamic-quantization":
        model_card, requests = quantizing_model(tmp_path), spread_rows(5)
    else:
        model_card = card("digits-mlp", max_batch_rows=1)
        requests = [heldout("digits-mlp")[i : i + 1] for i in range(5)]
    ex = executor([model_card])
    name = ex.descriptors[0].inputs[0].name
    with trio.fail_after(30):
        results = await run_held(ex, model_card.id, [({name: r}, ()) for r in requests])
        alone = await run_alone(model_card.id, [model_card], [({name: r}, ()) for r in requests])
    for m, a in zip(results, alone, strict=True):
        assert_same(m, a)
    assert not ex.batch_policy(model_card.id).merges
    assert (ex.runs, ex.merged, ex.counters.completed) == (5, 0, 5)


def test_a_graph_mixes_rows_with_dynamic_quantization_even_in_a_branch(tmp_path: Path) -> None:
    def branch(name: str, op: str) -> Any:
        nodes = [helper.make_node(op, ["x"], ["q", "s", "z"] if op != "Identity" else ["q"])]
        return helper.make_graph(nodes, name, [], [V("q", TensorProto.UINT8, ["N", 4])])

    plain = fixed_batch_model(tmp_path)
    assert not mixes_rows(plain.onnx_path)
    if_node = helper.make_node(
        "If",
        ["c"],
        ["y"],
        then_branch=branch("then", "DynamicQuantizeLinear"),
        else_branch=branch("else", "Identity"),
    )
    graph = helper.make_graph(
        [if_node],
        "g",
        [V("c", TensorProto.BOOL, []), V("x", TensorProto.FLOAT, ["N", 4])],
        [V("y", TensorProto.UINT8, ["N", 4])],
    )
    path = tmp_path / "branch.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert mixes_rows(path)
    unreadable = tmp_path / "garbage.onnx"
    unreadable.write_bytes(b"\xff" * 64)
    assert mixes_rows(unreadable)  # not known to be safe: not merged


async def test_minilm_text_jobs_are_never_merged_and_answer_as_alone() -> None:
    """Its int8 graph quantizes dynamically: merged, embeddings moved by up to 0.008."""
    cards = [card("minilm-l6-v2")]
    ex = executor(cards)
    texts = [f"the {w} sat near the river today" for w in ("cat", "dog", "bird")]  # same length

    async def job(i: int, into: list[np.ndarray]) -> None:
        into[i] = (await ex.run("minilm-l6-v2", {}, texts=[texts[i]])).outputs["embeddings"]

    merged: list[np.ndarray] = [np.empty(0)] * 3
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with ex.limiter:
                for i in range(3):
                    nursery.start_soon(job, i, merged)
                await ex.wait_counters(lambda c: c.admitted == 3)
        single = executor(cards, batching=False)
        alone = [
            (await single.run("minilm-l6-v2", {}, texts=[t])).outputs["embeddings"] for t in texts
        ]
    assert not ex.batch_policy("minilm-l6-v2").merges
    assert (ex.runs, ex.merged) == (3, 0)
    for m, a in zip(merged, alone, strict=True):
        np.testing.assert_array_equal(m, a)


def _spec(*shape: int | None) -> TensorSpec:
    return TensorSpec("t", "float32", shape)


def _descriptor(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> ModelDescriptor:
    return ModelDescriptor(
        id="m",
        version="1",
        sha256="f" * 64,
        task_type="t",
        subtypes=(),
        languages=(),
        max_input_length=0,
        accuracy=0.5,
        cost=1.0,
        description="",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    )


_POLICIES = [
    # inputs, outputs, card's max_batch_rows, node's, enabled -> merges, max_rows
    pytest.param([_spec(None, 4)], [_spec(None)], None, 100, True, True, 100, id="batch-axis"),
    pytest.param(
        [_spec(None, 4), _spec(None)], [_spec(None)], None, 100, True, True, 100, id="two-inputs"
    ),
    pytest.param([_spec(1, 4)], [_spec(1)], None, 100, True, False, 100, id="fixed-batch-1"),
    pytest.param([_spec(8, 4)], [_spec(8)], None, 100, True, False, 100, id="fixed-batch-8"),
    pytest.param(
        [_spec(None, 4), _spec(2)], [_spec(None)], None, 100, True, False, 100, id="one-input-fixed"
    ),
    pytest.param([_spec()], [_spec()], None, 100, True, False, 100, id="0-d"),
    pytest.param([_spec(None, 4)], [_spec(1, 4)], None, 100, True, False, 100, id="output-fixed"),
    pytest.param([_spec(None, 4)], [_spec(None)], 8, 100, True, True, 8, id="card-lowers"),
    pytest.param([_spec(None, 4)], [_spec(None)], 500, 100, True, True, 100, id="node-caps"),
    pytest.param([_spec(None, 4)], [_spec(None)], 1, 100, True, False, 1, id="card-says-1"),
    pytest.param([_spec(None, 4)], [_spec(None)], None, 1, True, False, 1, id="node-says-1"),
    pytest.param([_spec(None, 4)], [_spec(None)], None, 100, False, False, 100, id="off"),
]


@pytest.mark.parametrize(
    ("inputs", "outputs", "card_rows", "node_rows", "enabled", "merges", "max_rows"), _POLICIES
)
def test_batch_policy(
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    card_rows: int | None,
    node_rows: int,
    enabled: bool,
    merges: bool,
    max_rows: int,
) -> None:
    policy = BatchPolicy.of(
        _descriptor(inputs, outputs),
        card("digits-mlp", max_batch_rows=card_rows, max_batch_wait_us=250),
        node_rows,
        enabled=enabled,
    )
    assert (policy.merges, policy.max_rows, policy.wait_s) == (merges, max_rows, 250e-6)


# --- bad requests and failing runs -----------------------------------------------------


async def test_a_bad_request_is_refused_alone_while_the_good_ones_merge(digits) -> None:
    x, _ = digits
    cards = [card("digits-mlp")]
    ex = executor(cards)
    good = [({"input": x[i : i + 1]}, ()) for i in range(4)]
    results: list[Execution] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with ex.limiter:
                for inputs, _ in good:
                    nursery.start_soon(lambda i=inputs: _append(results, ex.run("digits-mlp", i)))
                await ex.wait_counters(lambda c: c.admitted == 4)
                for bad in ({"input": x[:1, :63]}, {"input": x[:1].astype(np.complex64)}):
                    with pytest.raises(JobError) as caught:
                        await ex.run("digits-mlp", bad)
                    assert caught.value.code is ErrorCode.INVALID_INPUT
        alone = await run_alone("digits-mlp", cards, good)
    assert sorted(int(r.outputs["label"][0]) for r in results) == sorted(
        int(a.outputs["label"][0]) for a in alone
    )
    c = ex.counters
    assert (c.admitted, c.completed, c.failed, ex.runs, ex.merged) == (4, 4, 0, 1, 4)


async def _append(results: list[Execution], run: Awaitable[Execution]) -> None:
    results.append(await run)


def gather_model(tmp_path: Path) -> ModelCard:
    """row = table[index] for a table of 5 rows: an index past 4 fails the run, though
    every input is valid in dtype and shape."""
    node = helper.make_node("Gather", ["init0", "index"], ["row"])
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    return onnx_model(
        tmp_path,
        "lookup",
        [node],
        [V("index", TensorProto.INT64, ["N"])],
        [V("row", TensorProto.FLOAT, ["N", 2])],
        [table],
    )


async def test_a_failing_merged_run_is_retried_alone_so_only_the_bad_request_fails(
    tmp_path: Path,
) -> None:
    ex = executor([gather_model(tmp_path)])
    indices = [[0], [1, 2], [9], [4]]
    outcome: dict[int, Execution | JobError] = {}

    async def one(i: int) -> None:
        try:
            outcome[i] = await ex.run("lookup", {"index": np.array(indices[i])})
        except JobError as error:
            outcome[i] = error

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with ex.limiter:
                for i in range(len(indices)):
                    nursery.start_soon(one, i)
                await ex.wait_counters(lambda c: c.admitted == len(indices))
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    for i in (0, 1, 3):
        result = outcome[i]
        assert isinstance(result, Execution)
        np.testing.assert_array_equal(result.outputs["row"], table[indices[i]])
    failure = outcome[2]
    assert isinstance(failure, JobError) and failure.code is ErrorCode.INVALID_INPUT
    assert "model lookup failed" in failure.message and "idx=9" in failure.message
    c = ex.counters
    # The merged run, then each of the four alone.
    assert (c.completed, c.failed, ex.runs, ex.merged) == (3, 1, 5, 0)


def twice_model(tmp_path: Path) -> ModelCard:
    """twice = concat(x, x): 2N rows for N, declared with a dynamic leading dim."""
    node = helper.make_node("Concat", ["x", "x"], ["twice"], axis=0)
    return onnx_model(
        tmp_path,
        "twice",
        [node],
        [V("x", TensorProto.FLOAT, ["N", 4])],
        [V("twice", TensorProto.FLOAT, ["M", 4])],
    )


async def test_outputs_that_do_not_split_by_rows_are_answered_alone_and_merge_no_more(
    tmp_path: Path,
) -> None:
    ex = executor([twice_model(tmp_path)])
    requests = [({"x": np.full((i + 1, 4), i, "f4")}, ()) for i in range(3)]
    with trio.fail_after(30):
        first = await run_held(ex, "twice", requests)
        assert ex.runs == 1 + 3  # merged, then each alone
        again = await run_held(ex, "twice", requests)
    for result in (*first, *again):
        (value,) = result.outputs.values()
        rows = value.shape[0] // 2
        np.testing.assert_array_equal(value, np.concatenate([value[:rows], value[:rows]]))
    assert [r.outputs["twice"].shape[0] for r in first] == [2, 4, 6]
    assert ex.runs == 4 + 3  # the model merges no more
    assert ex.merged == 0


# --- a large request in parts, in spare worker slots ----------------------------------------

SPARE = ExecutorConfig(workers=2, inline_below_ms=0)


async def _warm_small(ex: Executor, model_id: str, inputs: Inputs) -> None:
    """One small run, so the executor knows the model's cost: a request of N times
    its size is then estimated at N times its run, which for the large requests
    below is over SPLIT_ABOVE_MS (5 ms) for any run of onnxruntime over 1.3 us."""
    await ex.run(model_id, inputs)


async def test_a_large_request_runs_in_parts_in_free_slots_and_answers_as_one_run(
    digits,
) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp")], SPARE)
    large = np.resize(x, (4_096, x.shape[1]))
    with trio.fail_after(30):
        await _warm_small(ex, "digits-mlp", {"input": x[:1]})
        split = await ex.run("digits-mlp", {"input": large})
        (whole,) = await run_alone("digits-mlp", [card("digits-mlp")], [({"input": large}, ())])
    assert ex.split == 1 and ex.runs == 2
    assert_same(split, whole)
    assert ex.limiter.borrowed_tokens == 0  # both slots given back


async def test_a_large_request_runs_whole_when_no_other_slot_is_free(digits) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp")], SPARE)
    with trio.fail_after(30):
        await _warm_small(ex, "digits-mlp", {"input": x[:1]})
        async with ex.limiter:  # one of the two slots: the request gets the other
            result = await ex.run("digits-mlp", {"input": np.resize(x, (4_096, x.shape[1]))})
    assert ex.split == 0
    assert result.outputs["label"].shape == (4_096,)


async def test_a_part_that_fails_fails_its_request_as_a_whole_run_would(tmp_path: Path) -> None:
    lookup = gather_model(tmp_path)
    ex = executor([lookup], SPARE)
    bad = np.zeros(4_096, np.int64)
    bad[-1] = 9  # in the last part only
    with trio.fail_after(30):
        await _warm_small(ex, "lookup", {"index": np.array([0])})
        with pytest.raises(JobError) as failed:
            await ex.run("lookup", {"index": bad})
        with pytest.raises(JobError) as whole:
            await executor([lookup], batching=False).run("lookup", {"index": bad})
    assert failed.value.code is whole.value.code is ErrorCode.INVALID_INPUT
    assert "idx=9" in failed.value.message
    assert ex.limiter.borrowed_tokens == 0
    assert ex.split == 1  # it did run in parts


async def test_parts_whose_outputs_do_not_split_by_rows_are_run_again_whole(
    tmp_path: Path,
) -> None:
    ex = executor([twice_model(tmp_path)], SPARE)
    x = np.arange(4 * 1_024, dtype=np.float32).reshape(1_024, 4)
    with trio.fail_after(30):
        await _warm_small(ex, "twice", {"x": x[:1]})
        result = await ex.run("twice", {"x": x})
        again = await ex.run("twice", {"x": x})
    for r in (result, again):
        np.testing.assert_array_equal(r.outputs["twice"], np.concatenate([x, x]))
    assert ex.split == 0
    assert ex.runs == 3  # the warm-up, then each whole (the parts' run is not counted)


# --- cancellation ------------------------------------------------------------------------


async def test_a_request_cancelled_before_its_batch_starts_leaves_it(digits) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp")])
    results: dict[int, Execution] = {}
    scopes = [trio.CancelScope() for _ in range(3)]

    async def one(i: int) -> None:
        with scopes[i]:
            results[i] = await ex.run("digits-mlp", {"input": x[i : i + 1]})

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with ex.limiter:
                for i in range(3):
                    nursery.start_soon(one, i)
                await ex.wait_counters(lambda c: c.admitted == 3)
                scopes[1].cancel()
                await ex.wait_counters(lambda c: c.cancelled_waiting == 1)
                assert (ex.in_flight, ex.queue_length) == (2, 2)
    assert sorted(results) == [0, 2]
    assert ex.in_flight == ex.running == ex.queue_length == 0  # and the run was of two
    c = ex.counters
    assert (c.completed, ex.runs, ex.merged) == (2, 1, 2)
    assert (c.cancelled_waiting, c.cancelled_running) == (1, 0)


def _lane_with(
    model_id: str, x: np.ndarray, rows: Sequence[int], max_rows: int = 100
) -> tuple[Lane, list[Request]]:
    lane = Lane(model_id, BatchPolicy(max_rows, 0.0, merges=True))
    requests = []
    offset = 0
    for n in rows:
        requests.append(Request({"input": x[offset : offset + n]}, ["label", "probabilities"]))
        offset += n
    return lane, requests


async def test_a_request_that_leaves_a_batch_before_it_begins_is_not_run(digits) -> None:
    x, _ = digits
    model = load_model(card("digits-mlp"), ExecutorConfig())
    lane, requests = _lane_with("digits-mlp", x, [1, 2, 3])
    for r in requests:
        lane.queue(r)
    batch = lane.take(requests[0], requests[0], None)
    assert batch.members == requests and len(lane) == 0
    batch.leave(requests[1])
    assert not batch.options.terminate  # others are still in it
    result = execute(model, batch)
    assert set(result.answers) == {requests[0], requests[2]}
    assert not requests[1].began and requests[0].began
    assert result.answers[requests[2]].outputs["label"].shape == (3,)
    expected = model.session.run(["label"], {"input": x[3:6]})[0]
    np.testing.assert_array_equal(result.answers[requests[2]].outputs["label"], expected)
    for r in (requests[0], requests[2]):
        batch.leave(r)
    assert batch.options.terminate  # no request is left: the run is told to stop


async def test_a_request_cancelled_mid_run_on_its_own_terminates_the_run(digits) -> None:
    """The old rule, kept for a run of one: cancelling it tells onnxruntime to stop."""
    x, _ = digits
    lane, (request,) = _lane_with("digits-mlp", x, [1])
    lane.queue(request)
    batch = lane.take(request, request, None)
    request.began = True
    batch.leave(request)
    assert batch.options.terminate  # a run of one runs with its batch's options


# --- bounds: rows and the wait -------------------------------------------------------------

_TAKES = [
    # rows of the queued requests, max rows -> indexes taken with the first
    pytest.param([1] * 10, 4, [0, 1, 2, 3], id="ones-up-to-the-cap"),
    pytest.param([3, 2, 1], 4, [0, 2], id="skips-what-does-not-fit"),
    pytest.param([6, 1], 4, [0], id="first-bigger-than-the-cap-runs-alone"),
    pytest.param([2, 2, 2], 4, [0, 1], id="exactly-the-cap"),
    pytest.param([1, 1], 100, [0, 1], id="all"),
]


@pytest.mark.parametrize(("rows", "max_rows", "taken"), _TAKES)
async def test_a_batch_takes_queued_requests_in_order_within_max_rows(
    digits, rows: list[int], max_rows: int, taken: list[int]
) -> None:
    x, _ = digits
    lane, requests = _lane_with("digits-mlp", x, rows, max_rows)
    for r in requests:
        lane.queue(r)
    batch = lane.take(requests[0], requests[0], None)
    assert batch.members == [requests[i] for i in taken]
    assert len(lane) == len(rows) - len(taken)


async def test_a_request_waiting_for_a_slot_stops_waiting_when_a_batch_takes_it(digits) -> None:
    x, _ = digits
    lane, (first, waiting) = _lane_with("digits-mlp", x, [1, 1])
    lane.queue(first)
    lane.queue(waiting)
    released = trio.Event()

    async def wait_for_a_slot() -> None:
        with taken_along(waiting):
            await trio.sleep_forever()  # as for a worker slot that never frees
        released.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_a_slot)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.take(first, first, None).members == [first, waiting]
            await released.wait()
    assert waiting.scope is None


async def test_an_inline_run_takes_along_no_large_request_waiting_for_a_slot(digits) -> None:
    """A small model's inline run takes along only what keeps it within
    inline_below_ms: not a 60,000-row request queued for the worker slot."""
    x, _ = digits
    # 100 ms: see test_executor's test of a large request that does not run inline.
    ex = executor([card("digits-mlp")], ExecutorConfig(workers=1, inline_below_ms=100.0))
    large: list[Execution] = []
    with trio.fail_after(30):
        for i in range(4):  # the first in a worker thread, then inline
            await ex.run("digits-mlp", {"input": x[i : i + 1]})
        async with trio.open_nursery() as nursery:
            async with ex.limiter:
                rows = np.resize(x, (60_000, x.shape[1]))
                nursery.start_soon(_append, large, ex.run("digits-mlp", {"input": rows}))
                await ex.wait_counters(lambda c: c.admitted == 5)
                await trio.testing.wait_all_tasks_blocked()  # queued for the slot
                small = await ex.run("digits-mlp", {"input": x[:1]})  # inline
                await trio.testing.wait_all_tasks_blocked()
                assert (large, ex.in_flight) == ([], 1)  # not taken along
    assert small.outputs["label"].shape == (1,)
    assert large[0].outputs["label"].shape == (60_000,)


async def test_requests_that_do_not_stack_are_not_taken(digits) -> None:
    x, _ = digits
    lane, requests = _lane_with("digits-mlp", x, [1, 1])
    lane.queue(requests[0])
    odd = Request({"a": np.ones((2, 4), "f4"), "b": np.ones((3,), "f4")}, ["y"])  # 2 and 3 rows
    lane.queue(odd)
    lane.queue(requests[1])
    assert odd.key is None
    assert lane.take(odd, odd, None).members == [odd]
    assert lane.take(requests[0], requests[0], None).members == requests


@pytest.mark.parametrize(
    ("max_rows", "node_rows", "requests", "runs"),
    [
        pytest.param(4, 65_536, 10, 3, id="model.toml-4"),
        pytest.param(None, 3, 7, 3, id="node-3"),
    ],
)
async def test_max_batch_rows_bounds_the_rows_of_a_merged_run(
    digits, max_rows: int | None, node_rows: int, requests: int, runs: int
) -> None:
    x, _ = digits
    cards = [card("digits-mlp", max_batch_rows=max_rows)]
    ex = executor(cards, replace(HELD, max_batch_rows=node_rows))
    one_row = [({"input": x[i : i + 1]}, ()) for i in range(requests)]
    with trio.fail_after(30):
        merged = await run_held(ex, "digits-mlp", one_row)
        alone = await run_alone("digits-mlp", cards, one_row)
    for m, a in zip(merged, alone, strict=True):
        assert_same(m, a)
    assert ex.runs == runs  # ceil(requests / rows per run): each run full


async def test_a_request_with_more_rows_than_the_models_max_runs_alone(digits) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp", max_batch_rows=4)])
    with trio.fail_after(30):
        results = await run_held(
            ex, "digits-mlp", [({"input": x[:6]}, ()), ({"input": x[6:7]}, ())]
        )
    assert results[0].outputs["label"].shape == (6,)
    assert ex.runs == 2


WAITING = ExecutorConfig(inline_below_ms=1e6, max_batch_rows=8)


async def _warm(ex: Executor, model_id: str, x: np.ndarray) -> None:
    """One run in a worker thread, so that the next ones run inline (inline_below_ms)
    and the clock can jump: it stands still meanwhile. Its 8 rows fill a run (the
    node's max_batch_rows), so it waits for no company."""
    await ex.run(model_id, {"input": x[:8]})


@pytest.mark.parametrize(
    ("wait_us", "max_rows", "requests", "waited_s"),
    [
        pytest.param(0, None, 1, 0.0, id="default-idle"),
        pytest.param(0, None, 5, 0.0, id="default-busy"),
        pytest.param(2_000, None, 1, 0.002, id="wait-alone"),
        pytest.param(2_000, 3, 3, 0.0, id="wait-filled-at-once"),
    ],
)
async def test_a_run_waits_for_company_only_when_its_model_asks(
    digits,
    mock_clock: trio.testing.MockClock,
    wait_us: int,
    max_rows: int | None,
    requests: int,
    waited_s: float,
) -> None:
    x, _ = digits
    model_card = card("digits-mlp", max_batch_wait_us=wait_us, max_batch_rows=max_rows)
    ex = executor([model_card], WAITING)
    with trio.fail_after(30):
        await _warm(ex, "digits-mlp", x)
        mock_clock.autojump_threshold = 0  # from here every run is inline: no thread
        before = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(requests):
                nursery.start_soon(ex.run, "digits-mlp", {"input": x[i : i + 1]})
        assert trio.current_time() - before == pytest.approx(waited_s)
    assert ex.runs == 2  # the warm-up, and one for all


@pytest.mark.parametrize("company", [True, False])
async def test_a_request_known_to_come_alone_runs_without_waiting_a_round(
    digits, company: bool
) -> None:
    """The pipelined server clears COMPANY_EXPECTED for a request that came alone: an
    inline run then starts at once, where by default it waits a scheduling round
    for requests to merge with (seen here as the checkpoint a cancelled caller
    stops at)."""
    x, _ = digits
    ex = executor([card("digits-mlp")], WAITING)
    answered: list[Execution] = []

    async def lone() -> None:
        COMPANY_EXPECTED.set(company)  # in this task's context only
        with trio.CancelScope() as scope:
            scope.cancel()
            answered.append(await ex.run("digits-mlp", {"input": x[:1]}))

    with trio.fail_after(30):
        await _warm(ex, "digits-mlp", x)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lone)
    counters = ex.counters
    if company:
        assert not answered and counters.cancelled_waiting == 1 and ex.runs == 1
    else:
        assert len(answered) == 1 and counters.completed == 2 and ex.runs == 2
    assert COMPANY_EXPECTED.get()


async def test_a_waiting_run_takes_what_arrives_before_its_deadline(
    digits, mock_clock: trio.testing.MockClock
) -> None:
    x, _ = digits
    ex = executor([card("digits-mlp", max_batch_wait_us=5_000)], WAITING)
    with trio.fail_after(30):
        await _warm(ex, "digits-mlp", x)
        mock_clock.autojump_threshold = 0
        before = trio.current_time()

        async def late(delay: float, i: int) -> None:
            await trio.sleep(delay)
            await ex.run("digits-mlp", {"input": x[i : i + 1]})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late, 0.0, 1)
            nursery.start_soon(late, 0.004, 2)  # within the first one's 5 ms
            nursery.start_soon(late, 0.007, 3)  # after: a run of its own, at 12 ms
        assert trio.current_time() - before == pytest.approx(0.012)
    assert ex.runs == 1 + 2
    assert ex.merged == 2


# --- model.toml ------------------------------------------------------------------------

_TOML = (
    'id = "m"\nversion = "1"\ntask_type = "t"\nmax_input_length = 4\naccuracy = 1.0\ncost = 1.0\n'
)


@pytest.mark.parametrize(
    ("lines", "rows", "wait_us"),
    [
        pytest.param("", None, 0.0, id="neither"),
        pytest.param("max_batch_rows = 32\n", 32, 0.0, id="rows"),
        pytest.param("max_batch_rows = 1\n", 1, 0.0, id="never-merged"),
        pytest.param("max_batch_wait_us = 500\n", None, 500.0, id="wait-int"),
        pytest.param("max_batch_wait_us = 0.5\n", None, 0.5, id="wait-float"),
        pytest.param("max_batch_wait_us = 1_000_000\n", None, 1e6, id="wait-at-the-cap"),
    ],
)
def test_model_toml_may_set_the_batching_bounds(
    tmp_path: Path, lines: str, rows: int | None, wait_us: float
) -> None:
    parsed = read_model_card(_model_dir(tmp_path, lines))
    assert (parsed.max_batch_rows, parsed.max_batch_wait_us) == (rows, wait_us)


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        pytest.param("max_batch_rows = 0\n", "max_batch_rows must be >= 1", id="rows-0"),
        pytest.param("max_batch_rows = -4\n", "max_batch_rows must be >= 1", id="rows-negative"),
        pytest.param("max_batch_rows = 2.5\n", "has the wrong type", id="rows-float"),
        pytest.param("max_batch_rows = true\n", "has the wrong type", id="rows-bool"),
        pytest.param('max_batch_rows = "8"\n', "max_batch_rows has the wrong type", id="rows-str"),
        pytest.param("max_batch_wait_us = -1\n", "max_batch_wait_us must be 0 to", id="wait-<0"),
        pytest.param("max_batch_wait_us = 1_000_001\n", "1,000,000 microseconds", id="wait-big"),
        pytest.param("max_batch_wait_us = nan\n", "max_batch_wait_us must be 0", id="wait-nan"),
        pytest.param("max_batch_wait_us = inf\n", "max_batch_wait_us must be 0", id="wait-inf"),
        pytest.param("max_batch_wait_us = false\n", "wrong type", id="wait-bool"),
    ],
)
def test_bad_batching_bounds_in_model_toml_are_refused_naming_the_file(
    tmp_path: Path, lines: str, says: str
) -> None:
    directory = _model_dir(tmp_path, lines)
    with pytest.raises(RepositoryError) as caught:
        read_model_card(directory)
    assert says in str(caught.value) and str(directory / "model.toml") in str(caught.value)


def _model_dir(tmp_path: Path, lines: str) -> Path:
    """Model "m": a model.toml with `lines` added, and an (unread) model.onnx."""
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "model.toml").write_text(_TOML + lines)
    (directory / "model.onnx").write_bytes(b"")
    return directory
