"""What the executor accepts as model inputs, and which onnxruntime providers it picks."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import trio

from gossip import ModelDescriptor, TensorSpec
from p2p_node._executor import GPU_PROVIDERS, choose_providers, validate_inputs
from scheduler import ErrorCode, JobError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _model(*inputs: TensorSpec, model_id: str = "m") -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1",
        sha256="f" * 64,
        task_type="tabular-classification",
        subtypes=(),
        languages=(),
        max_input_length=0,
        accuracy=0.5,
        cost=1.0,
        description="",
        inputs=inputs,
        outputs=(TensorSpec("label", "int64", (None,)),),
    )


SINGLE = _model(TensorSpec("input", "float32", (None, 64)), model_id="digits")
PAIR = _model(
    TensorSpec("features", "float32", (None, 4)),
    TensorSpec("ids", "int64", (None,)),
    model_id="pair",
)
FIXED = _model(TensorSpec("image", "uint8", (1, 8, 8)), model_id="fixed")
SCALAR = _model(TensorSpec("threshold", "float64", ()), model_id="scalar")
INTEGER = _model(TensorSpec("tokens", "int64", (None, 16)), model_id="tokens")
NARROW = _model(TensorSpec("ids", "int32", (None,)), model_id="narrow")


def _f32(*shape: int) -> np.ndarray[Any, Any]:
    return np.ones(shape, dtype=np.float32)


# --- accepted --------------------------------------------------------------------------

_ACCEPTED = [
    pytest.param(SINGLE, {"input": _f32(5, 64)}, {"input": (5, 64)}, id="exact"),
    pytest.param(SINGLE, {"input": _f32(1, 64)}, {"input": (1, 64)}, id="dynamic-batch-1"),
    pytest.param(SINGLE, {"input": _f32(300, 64)}, {"input": (300, 64)}, id="dynamic-batch-300"),
    pytest.param(SINGLE, {"": _f32(2, 64)}, {"input": (2, 64)}, id="unnamed-single-input"),
    pytest.param(
        PAIR,
        {"features": _f32(3, 4), "ids": np.arange(3)},
        {"features": (3, 4), "ids": (3,)},
        id="two-inputs",
    ),
    pytest.param(
        PAIR,
        {"features": _f32(3, 4), "ids": np.arange(7)},
        {"features": (3, 4), "ids": (7,)},
        id="independent-dynamic-dims",
    ),
    pytest.param(
        FIXED, {"image": np.zeros((1, 8, 8), np.uint8)}, {"image": (1, 8, 8)}, id="fixed-dims"
    ),
    pytest.param(SCALAR, {"threshold": np.float64(0.5)}, {"threshold": ()}, id="0-d"),
    pytest.param(
        SINGLE, {"input": np.ones((2, 64), np.int64)}, {"input": (2, 64)}, id="int64-to-f32"
    ),
    pytest.param(SINGLE, {"input": np.ones((2, 64))}, {"input": (2, 64)}, id="float64-to-f32"),
    pytest.param(
        SINGLE, {"input": np.ones((2, 64), np.float16)}, {"input": (2, 64)}, id="float16-to-f32"
    ),
    pytest.param(
        SINGLE, {"input": np.ones((2, 64), np.uint8)}, {"input": (2, 64)}, id="uint8-to-f32"
    ),
    pytest.param(SINGLE, {"input": np.ones((2, 64), bool)}, {"input": (2, 64)}, id="bool-to-f32"),
    pytest.param(
        INTEGER, {"tokens": np.ones((2, 16), np.int32)}, {"tokens": (2, 16)}, id="int32-to-int64"
    ),
    pytest.param(
        SINGLE, {"input": [[0.5] * 64, [1.5] * 64]}, {"input": (2, 64)}, id="nested-lists"
    ),
    pytest.param(
        NARROW,
        {"ids": np.array([-(2**31), 2**31 - 1], np.int64)},
        {"ids": (2,)},
        id="int64-to-int32-in-range",
    ),
    pytest.param(
        SINGLE, {"input": np.full((1, 64), np.inf)}, {"input": (1, 64)}, id="inf-stays-inf"
    ),
]


@pytest.mark.parametrize(("model", "inputs", "shapes"), _ACCEPTED)
def test_valid_inputs_become_feeds_of_the_declared_dtype(
    model: ModelDescriptor, inputs: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> None:
    feeds = validate_inputs(model, inputs)

    declared = {spec.name: spec.dtype for spec in model.inputs}
    assert {name: a.shape for name, a in feeds.items()} == shapes
    assert {name: a.dtype.name for name, a in feeds.items()} == declared
    for name, array in feeds.items():
        original = inputs.get(name, inputs.get(""))
        np.testing.assert_array_equal(array, np.asarray(original).astype(declared[name]))


def test_a_cast_keeps_the_values() -> None:
    feeds = validate_inputs(SINGLE, {"input": np.arange(128, dtype=np.int64).reshape(2, 64)})
    assert feeds["input"].dtype == np.float32
    assert feeds["input"][1, 63] == 127.0


def test_an_input_of_the_declared_dtype_is_not_copied() -> None:
    array = _f32(2, 64)
    assert validate_inputs(SINGLE, {"input": array})["input"] is array


# --- refused ---------------------------------------------------------------------------

_REFUSED = [
    # names
    pytest.param(SINGLE, {}, ["takes inputs input float32 [N, 64]", "got none"], id="no-inputs"),
    pytest.param(
        SINGLE, {"Input": _f32(1, 64)}, ["input float32 [N, 64]", "['Input']"], id="wrong-case"
    ),
    pytest.param(
        SINGLE,
        {"input": _f32(1, 64), "extra": _f32(1)},
        ["input float32 [N, 64]", "['extra', 'input']"],
        id="extra-input",
    ),
    pytest.param(
        SINGLE,
        {"": _f32(1, 64), "input": _f32(1, 64)},
        ["['', 'input']"],
        id="unnamed-and-named",
    ),
    pytest.param(
        PAIR,
        {"": _f32(3, 4)},
        ["features float32 [N, 4], ids int64 [N]", "['']"],
        id="unnamed-for-two-input-model",
    ),
    pytest.param(
        PAIR,
        {"features": _f32(3, 4)},
        ["features float32 [N, 4], ids int64 [N]", "['features']"],
        id="missing-second-input",
    ),
    # shapes
    pytest.param(
        SINGLE,
        {"input": _f32(64)},
        ["expects input float32 [N, 64]", "got input float32 [64]"],
        id="rank-too-low",
    ),
    pytest.param(
        SINGLE,
        {"input": _f32(1, 1, 64)},
        ["expects input float32 [N, 64]", "got input float32 [1, 1, 64]"],
        id="rank-too-high",
    ),
    pytest.param(
        SINGLE,
        {"input": _f32(2, 63)},
        ["expects input float32 [N, 64]", "got input float32 [2, 63]"],
        id="fixed-dim-wrong",
    ),
    pytest.param(
        FIXED,
        {"image": np.zeros((2, 8, 8), np.uint8)},
        ["expects image uint8 [1, 8, 8]", "got image uint8 [2, 8, 8]"],
        id="fixed-batch-wrong",
    ),
    pytest.param(
        SCALAR,
        {"threshold": np.array([0.5])},
        ["expects threshold float64 []", "got threshold float64 [1]"],
        id="vector-for-scalar",
    ),
    pytest.param(
        SINGLE,
        {"input": _f32(0, 64)},
        ["input 'input' is empty"],
        id="empty-batch",
    ),
    # dtypes
    pytest.param(
        INTEGER,
        {"tokens": np.ones((2, 16), np.float32)},
        ["expects tokens int64 [N, 16]", "got tokens float32 [2, 16]"],
        id="float32-to-int64",
    ),
    pytest.param(
        FIXED,
        {"image": np.zeros((1, 8, 8), np.int16)},
        ["expects image uint8 [1, 8, 8]", "got image int16 [1, 8, 8]"],
        id="signed-to-unsigned",
    ),
    # values a cast would change: wrapped, or made inf
    pytest.param(
        NARROW,
        {"ids": np.array([1, 2**31], np.int64)},
        ["input 'ids' holds 2147483648", "outside int32's range [-2147483648, 2147483647]"],
        id="int64-past-int32",
    ),
    pytest.param(
        NARROW,
        {"ids": np.array([-(2**40), 1], np.int64)},
        ["holds -1099511627776", "outside int32's range"],
        id="int64-below-int32",
    ),
    pytest.param(
        SINGLE,
        {"input": np.full((1, 64), 1e300)},
        ["input 'input' holds values beyond float32's range (+-3.403e+38)"],
        id="float64-past-float32",
    ),
]


def _assert_refused(model: ModelDescriptor, inputs: dict[str, Any], says: list[str]) -> None:
    with pytest.raises(JobError) as caught:
        validate_inputs(model, inputs)

    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert not caught.value.code.retryable
    assert f"model {model.id}" in caught.value.message
    for fragment in says:
        assert fragment in caught.value.message


@pytest.mark.parametrize(("model", "inputs", "says"), _REFUSED)
def test_invalid_inputs_are_refused_with_what_was_expected_and_what_came(
    model: ModelDescriptor, inputs: dict[str, Any], says: list[str]
) -> None:
    _assert_refused(model, inputs, says)


# Dtypes and ranks the wire never carries, but a local caller can pass: the refusal
# message is built with a TensorSpec of what came, and TensorSpec refuses them.
_REFUSED_BUT_CRASHES = [
    pytest.param(
        SINGLE,
        {"input": np.ones((2, 64), np.complex64)},
        ["expects input float32 [N, 64]", "got input complex64 [2, 64]"],
        id="complex-to-float",
    ),
    pytest.param(
        SINGLE,
        {"input": np.full((2, 64), "x")},
        ["expects input float32 [N, 64]"],
        id="strings",
    ),
    pytest.param(
        SINGLE,
        {"input": np.full((2, 64), None, dtype=object)},
        ["expects input float32 [N, 64]", "got input object [2, 64]"],
        id="objects",
    ),
    pytest.param(
        SINGLE,
        {"input": _f32(*[1] * 9)},
        ["expects input float32 [N, 64]", "got input float32 [1, 1, 1, 1, 1, 1, 1, 1, 1]"],
        id="rank-9",
    ),
]


@pytest.mark.parametrize(("model", "inputs", "says"), _REFUSED_BUT_CRASHES)
def test_unsupported_dtypes_and_ranks_are_refused_as_invalid_input(
    model: ModelDescriptor, inputs: dict[str, Any], says: list[str]
) -> None:
    _assert_refused(model, inputs, says)


# --- providers -------------------------------------------------------------------------

_PROVIDERS = [
    pytest.param([CPU], True, [CPU], id="cpu-only-machine"),
    pytest.param([], True, [CPU], id="nothing-reported"),
    pytest.param([CUDA, CPU], True, [CUDA, CPU], id="gpu-wanted-and-present"),
    pytest.param([CPU, CUDA], True, [CUDA, CPU], id="gpu-listed-after-cpu"),
    pytest.param([CUDA, CPU], False, [CPU], id="gpu-present-not-wanted"),
    pytest.param([CPU], False, [CPU], id="neither"),
    pytest.param(
        ["TensorrtExecutionProvider", CUDA, CPU], True, [CUDA, CPU], id="unknown-gpu-ignored"
    ),
    pytest.param(["AzureExecutionProvider", CPU], True, [CPU], id="other-providers-ignored"),
    pytest.param([CUDA], True, [CUDA, CPU], id="cpu-always-added"),
]


@pytest.mark.parametrize(("available", "use_gpu", "chosen"), _PROVIDERS)
def test_choose_providers(available: list[str], use_gpu: bool, chosen: list[str]) -> None:
    assert choose_providers(available, use_gpu) == chosen


def test_choose_providers_takes_any_iterable() -> None:
    assert choose_providers(iter([CUDA, CPU]), use_gpu=True) == [CUDA, CPU]


@pytest.mark.parametrize("use_gpu", [True, False], ids=["gpu-wanted", "gpu-not-wanted"])
def test_choose_providers_on_this_machine_ends_with_cpu(use_gpu: bool) -> None:
    available = ort.get_available_providers()
    chosen = choose_providers(available, use_gpu)
    assert chosen[-1] == CPU
    assert set(chosen) <= {*GPU_PROVIDERS, CPU}
    assert all(p in available for p in chosen[:-1])
    if not use_gpu:
        assert chosen == [CPU]


# --- the cap on rows per request -------------------------------------------------------

_CAPPED = [
    pytest.param(SINGLE, {"input": _f32(4, 64)}, True, id="at-the-cap"),
    pytest.param(SINGLE, {"input": _f32(5, 64)}, False, id="one-past"),
    pytest.param(
        PAIR, {"features": _f32(3, 4), "ids": np.arange(5)}, False, id="second-input-past"
    ),
    pytest.param(FIXED, {"image": np.zeros((1, 8, 8), np.uint8)}, True, id="fixed-batch-dim"),
    pytest.param(SCALAR, {"threshold": np.float64(0.5)}, True, id="0-d"),
]


@pytest.mark.parametrize(("model", "inputs", "accepted"), _CAPPED)
def test_the_rows_of_a_batch_axis_are_capped(
    model: ModelDescriptor, inputs: dict[str, Any], accepted: bool
) -> None:
    if accepted:
        validate_inputs(model, inputs, max_rows=4)
        return
    with pytest.raises(JobError) as caught:
        validate_inputs(model, inputs, max_rows=4)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert "5 rows" in caught.value.message and "cap of 4 rows" in caught.value.message
    assert "max_batch_rows" in caught.value.message and "--batch-size" in caught.value.message


async def test_the_executor_applies_its_configured_cap(digits) -> None:
    from p2p_node import ExecutorConfig, bundled_models_dir
    from p2p_node._executor import Executor
    from p2p_node._repository import read_repository

    x, _ = digits
    cards = read_repository(bundled_models_dir(), frozenset({"digits-logreg"}))
    ex = Executor.from_cards(cards, ExecutorConfig(max_batch_rows=10))
    with trio.fail_after(10):
        assert (await ex.run("digits-logreg", {"input": x[:10]})).outputs["label"].shape == (10,)
        with pytest.raises(JobError) as caught:
            await ex.run("digits-logreg", {"input": x[:11]})
    assert "cap of 10 rows" in caught.value.message
    assert ex.counters.admitted == 1  # refused before admission
