"""The wire codec: round trips, and every way bytes from a peer can be wrong."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gossip import MAX_RANK, TENSOR_DTYPES, ModelDescriptor, TensorSpec
from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._messages import (
    MAX_MESSAGE_LENGTH,
    MAX_TENSORS,
    MAX_TIMEOUT_MS,
    VERSION,
    ErrorReply,
    LoadReply,
    LoadRequest,
    ModelsReply,
    ModelsRequest,
    RunRequest,
    SyncReply,
    SyncRequest,
    WireError,
)
from scheduler import ErrorCode, InferenceResult, JobError

MALFORMED = ErrorCode.MALFORMED_MESSAGE

# --- helpers ---------------------------------------------------------------------------


def _descriptor(model_id: str = "digits-mlp") -> ModelDescriptor:
    return ModelDescriptor(
        id=model_id,
        version="1.0.0",
        sha256="0123456789abcdef" * 4,
        task_type="image-classification",
        subtypes=("digits",),
        languages=("en", "de"),
        max_input_length=64,
        accuracy=0.9778,
        cost=1.07,
        description="an MLP on 8x8 digits",
        inputs=(TensorSpec("input", "float32", (None, 64)),),
        outputs=(
            TensorSpec("label", "int64", (None,)),
            TensorSpec("probabilities", "float32", (None, 10)),
        ),
    )


def _run_request() -> RunRequest:
    return RunRequest(
        job_id="job-1",
        model_id="digits-mlp",
        inputs={
            "input": np.arange(12, dtype=np.float32).reshape(3, 4),
            "mask": np.array([True, False, True]),
            "": np.int64(7).reshape(()),
        },
        timeout_ms=5_000,
    )


def _run_reply() -> InferenceResult:
    return InferenceResult(
        job_id="job-1",
        model_id="digits-mlp",
        outputs={"label": np.array([3, 1], dtype=np.int64)},
        executor="12D3KooWpeer",
        queue_ms=0.25,
        compute_ms=1.5,
    )


def _wire_tensor(dtype: str = "float32", shape: list[Any] | None = None, data: Any = None) -> Any:
    shape = [2, 3] if shape is None else shape
    if data is None:
        data = bytes(math.prod(shape) * np.dtype(dtype).itemsize)
    return {"dtype": dtype, "shape": shape, "data": data}


def _run_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "kind": "run",
        "job_id": "job-1",
        "model_id": "m",
        "inputs": {"x": _wire_tensor()},
        "timeout_ms": 1000,
        "strategy": None,
        "requires": {"min_memory_mb": 0, "gpu": "any", "provider": None},
        "task": None,
        "selection": None,
        "context": {},
        "hedge": False,
    }
    body.update(changes)
    return body


def _result_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "kind": "result",
        "job_id": "job-1",
        "model_id": "m",
        "outputs": {"y": _wire_tensor("int64", [2])},
        "executor": "peer",
        "queue_ms": 0.5,
        "compute_ms": 2.0,
        "route": [],
    }
    body.update(changes)
    return body


def _error_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "kind": "error",
        "code": int(ErrorCode.OVERLOADED),
        "message": "busy",
        "peer": "peer",
    }
    body.update(changes)
    return body


def _models_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "kind": "models",
        "peer_id": "peer",
        "models": [msgpack.unpackb(encode(ModelsReply("p", (_descriptor(),))))["models"][0]],
    }
    body.update(changes)
    return body


def _pack(body: object) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _assert_tensors_equal(got: Any, want: Any) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        array = np.asarray(array)
        assert got[name].dtype.name == array.dtype.name, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)


def _rejects(decode: Any, payload: bytes, code: ErrorCode = MALFORMED) -> WireError:
    with pytest.raises(WireError) as caught:
        decode(payload)
    assert caught.value.code is code, caught.value
    return caught.value


# --- round trips -----------------------------------------------------------------------

_SHAPES = [(), (1,), (5,), (2, 3), (4, 1, 2), (0,), (3, 0), (1,) * MAX_RANK]


@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES))
def test_run_request_round_trips_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    array = (np.arange(math.prod(shape)) % 7).astype(dtype).reshape(shape)
    request = RunRequest("job", "model", {"x": array}, timeout_ms=1)

    decoded = decode_request(encode(request))

    assert isinstance(decoded, RunRequest)
    assert (decoded.job_id, decoded.model_id, decoded.timeout_ms) == ("job", "model", 1)
    _assert_tensors_equal(decoded.inputs, {"x": array})


@pytest.mark.parametrize("batch", [1, 2, 17], ids=lambda b: f"batch={b}")
def test_dynamic_batch_round_trips(batch: int) -> None:
    array = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    decoded = decode_request(encode(RunRequest("j", "m", {"input": array}, 10)))
    assert isinstance(decoded, RunRequest)
    _assert_tensors_equal(decoded.inputs, {"input": array})


_AWKWARD_ARRAYS = {
    "big-endian": np.arange(6, dtype=">f8").reshape(2, 3),
    "fortran-order": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
    "strided-view": np.arange(20, dtype=np.int16)[::3],
    "transposed": np.arange(12, dtype=np.uint16).reshape(3, 4).T,
    "nan-and-inf": np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float16),
}


@pytest.mark.parametrize("array", _AWKWARD_ARRAYS.values(), ids=_AWKWARD_ARRAYS.keys())
def test_awkward_memory_layouts_round_trip_by_value(array: np.ndarray[Any, Any]) -> None:
    decoded = decode_request(encode(RunRequest("j", "m", {"x": array}, 10)))
    assert isinstance(decoded, RunRequest)
    _assert_tensors_equal(decoded.inputs, {"x": array})


def test_run_request_with_several_tensors_round_trips() -> None:
    request = _run_request()
    decoded = decode_request(encode(request))
    assert isinstance(decoded, RunRequest)
    assert decoded.timeout_ms == request.timeout_ms
    _assert_tensors_equal(decoded.inputs, request.inputs)


def test_run_reply_round_trips() -> None:
    reply = _run_reply()
    decoded = decode_reply(encode(reply))
    assert isinstance(decoded, InferenceResult)
    assert (decoded.job_id, decoded.model_id, decoded.executor) == (
        "job-1",
        "digits-mlp",
        "12D3KooWpeer",
    )
    assert (decoded.queue_ms, decoded.compute_ms) == (0.25, 1.5)
    _assert_tensors_equal(decoded.outputs, reply.outputs)


def test_run_reply_with_integer_timings_decodes_as_floats() -> None:
    decoded = decode_reply(_pack(_result_body(queue_ms=0, compute_ms=3)))
    assert isinstance(decoded, InferenceResult)
    assert (decoded.queue_ms, decoded.compute_ms) == (0.0, 3.0)
    assert type(decoded.queue_ms) is float


# --- load: probes, and the load an answer reports -------------------------------------


@pytest.mark.parametrize(
    "message",
    [LoadRequest(), LoadReply("12D3KooWpeer", 2, 7), LoadReply("p", 0, 0)],
    ids=["probe", "busy", "idle"],
)
def test_load_messages_round_trip(message: LoadRequest | LoadReply) -> None:
    decode = decode_request if isinstance(message, LoadRequest) else decode_reply
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "message",
    [SyncRequest(()), SyncRequest((b"a", b"")), SyncReply((b"\x00",))],
    ids=["empty sync?", "sync?", "sync"],
)
def test_sync_messages_round_trip(message: Any) -> None:
    decode = decode_request if isinstance(message, SyncRequest) else decode_reply
    assert decode(encode(message)) == message


@pytest.mark.parametrize("messages", [["text"], [1], "notalist", [[b"x"]]])
def test_a_sync_of_anything_but_a_list_of_bytes_is_refused(messages: object) -> None:
    payload = msgpack.packb({"v": 1, "kind": "sync?", "messages": messages})
    with pytest.raises(WireError):
        decode_request(payload)


def test_a_load_reply_sums_running_and_queued() -> None:
    assert LoadReply("p", 2, 7).load == 9


@pytest.mark.parametrize("load", [0, 41])
def test_a_run_reply_carries_the_executors_load(load: int) -> None:
    decoded = decode_reply(encode(replace(_run_reply(), load=load)))
    assert isinstance(decoded, InferenceResult)
    assert decoded.load == load


def test_a_run_reply_without_load_has_no_such_field_and_decodes_as_unknown() -> None:
    # A result without a load (an older executor's) decodes; one that has none to
    # report sends none. (An older coordinator still rejects a result with a load.)
    assert "load" not in msgpack.unpackb(encode(_run_reply()))
    decoded = decode_reply(_pack(_result_body()))
    assert isinstance(decoded, InferenceResult)
    assert decoded.load is None


@pytest.mark.parametrize("value", [-1, 2**31, 1.5, "3", None, True])
@pytest.mark.parametrize(
    "body",
    [
        lambda v: _result_body(load=v),
        lambda v: {"v": VERSION, "kind": "load", "peer_id": "p", "in_flight": v, "queue_length": 0},
        lambda v: {"v": VERSION, "kind": "load", "peer_id": "p", "in_flight": 0, "queue_length": v},
    ],
    ids=["result-load", "in_flight", "queue_length"],
)
def test_a_bad_load_count_is_malformed(body: Any, value: object) -> None:
    with pytest.raises(WireError) as caught:
        decode_reply(_pack(body(value)))
    assert caught.value.code == MALFORMED


def test_a_probe_takes_no_fields() -> None:
    with pytest.raises(WireError) as caught:
        decode_request(msgpack.packb({"v": VERSION, "kind": "load?", "model_id": "m"}))
    assert "unknown fields ['model_id']" in caught.value.message


@pytest.mark.parametrize(
    "reply",
    [
        ErrorReply(ErrorCode.OVERLOADED, "queue full", "12D3KooWpeer"),
        ErrorReply(ErrorCode.UNKNOWN_MODEL, "", ""),
        ErrorReply(ErrorCode.INTERNAL, "ünïcödé ✓", "p"),
        ErrorReply(ErrorCode.OVERLOADED, "slow down", "p", retry_after=0.25),
        ErrorReply(ErrorCode.UNAUTHORIZED, "not on the allowlist", "p"),
    ],
    ids=["overloaded", "empty-message-and-peer", "unicode", "retry-after", "unauthorized"],
)
def test_error_reply_round_trips(reply: ErrorReply) -> None:
    assert decode_reply(encode(reply)) == reply


def test_error_reply_message_is_cut_to_the_limit() -> None:
    decoded = decode_reply(encode(ErrorReply(ErrorCode.INTERNAL, "x" * 10_000, "p")))
    assert isinstance(decoded, ErrorReply)
    assert decoded.message == "x" * MAX_MESSAGE_LENGTH


def test_an_error_reply_without_retry_after_has_no_such_field_on_the_wire() -> None:
    # Older peers reject unknown fields: only a reply that needs it carries one.
    body = msgpack.unpackb(encode(ErrorReply(ErrorCode.OVERLOADED, "full", "p")))
    assert "retry_after" not in body
    old = {"v": VERSION, "kind": "error", "code": 7, "message": "full", "peer": "p"}
    decoded = decode_reply(msgpack.packb(old))
    assert decoded == ErrorReply(ErrorCode.OVERLOADED, "full", "p", retry_after=None)


@pytest.mark.parametrize("value", [None, -1.0, math.nan, math.inf, "1", True, [1]])
def test_a_bad_retry_after_is_malformed(value: object) -> None:
    body = {"v": VERSION, "kind": "error", "code": 7, "message": "", "peer": "p"}
    with pytest.raises(WireError) as caught:
        decode_reply(msgpack.packb({**body, "retry_after": value}))
    assert caught.value.code == MALFORMED
    assert "retry_after" in caught.value.message


def test_retry_after_is_an_error_field_only() -> None:
    body = msgpack.unpackb(encode(ModelsRequest()))
    with pytest.raises(WireError) as caught:
        decode_request(msgpack.packb({**body, "retry_after": 1.0}))
    assert "unknown fields ['retry_after']" in caught.value.message


def test_retry_after_travels_with_the_job_error() -> None:
    error = JobError(ErrorCode.OVERLOADED, "rate", retry_after=1.5)
    back = decode_reply(encode(ErrorReply.from_error(error, peer="me")))
    assert isinstance(back, ErrorReply)
    assert back.to_error().retry_after == 1.5


def test_error_reply_converts_to_and_from_job_error() -> None:
    error = JobError(ErrorCode.DEADLINE_EXCEEDED, "too slow")
    reply = ErrorReply.from_error(error, peer="me")
    back = decode_reply(encode(reply))
    assert isinstance(back, ErrorReply)
    as_error = back.to_error()
    assert (as_error.code, as_error.message, as_error.peer) == (
        ErrorCode.DEADLINE_EXCEEDED,
        "too slow",
        "me",
    )


def test_models_request_round_trips() -> None:
    assert decode_request(encode(ModelsRequest())) == ModelsRequest()


@pytest.mark.parametrize("count", [0, 1, 3], ids=lambda n: f"{n}-models")
def test_models_reply_round_trips_real_descriptors(count: int) -> None:
    reply = ModelsReply("12D3KooWpeer", tuple(_descriptor(f"model-{i}") for i in range(count)))
    decoded = decode_reply(encode(reply))
    assert decoded == reply
    if count:
        assert isinstance(decoded, ModelsReply)
        assert decoded.models[0].inputs[0].shape == (None, 64)


def test_unknown_error_code_decodes_as_internal_and_keeps_the_message() -> None:
    decoded = decode_reply(_pack(_error_body(code=999, message="from the future")))
    assert decoded == ErrorReply(ErrorCode.INTERNAL, "from the future", "peer")


@pytest.mark.parametrize("timeout_ms", [1, MAX_TIMEOUT_MS], ids=["one", "max"])
def test_timeout_at_the_bounds_is_accepted(timeout_ms: int) -> None:
    decoded = decode_request(_pack(_run_body(timeout_ms=timeout_ms)))
    assert isinstance(decoded, RunRequest)
    assert decoded.timeout_ms == timeout_ms


def test_the_tensor_limit_is_inclusive() -> None:
    inputs = {f"t{i}": _wire_tensor() for i in range(MAX_TENSORS)}
    decoded = decode_request(_pack(_run_body(inputs=inputs)))
    assert isinstance(decoded, RunRequest)
    assert len(decoded.inputs) == MAX_TENSORS


# --- encode refuses what the wire cannot carry -------------------------------------------

_UNENCODABLE = {
    "object": np.array([object(), None], dtype=object),
    "complex64": np.ones(3, dtype=np.complex64),
    "unicode": np.array(["a", "bc"]),
    "datetime": np.array(["2024-01-01"], dtype="datetime64[D]"),
}


@pytest.mark.parametrize("array", _UNENCODABLE.values(), ids=_UNENCODABLE.keys())
def test_encode_refuses_unsupported_dtypes(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(JobError) as caught:
        encode(RunRequest("j", "m", {"bad": array}, 10))
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert "'bad'" in caught.value.message
    assert array.dtype.name in caught.value.message


# --- rejections ------------------------------------------------------------------------

_GARBAGE = {
    "empty": b"",
    "reserved-byte": b"\xc1",
    "text": b"hello, peer",
    "truncated-str": b"\xa5ab",
    "bad-utf8": b"\x82\xa1v\x01\xa4kind\xa2\xff\xfe",
    "trailing-bytes": encode(ModelsRequest()) + b"\x00",
    "two-messages": encode(ModelsRequest()) * 2,
    "int-map-key": _pack({1: 2}),
    "deep-lists": b"\x91" * 100_000 + b"\xc0",
    "deep-maps": b"\x81\xa1k" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("payload", _GARBAGE.values(), ids=_GARBAGE.keys())
@pytest.mark.parametrize("decode", [decode_request, decode_reply])
def test_garbage_is_malformed(decode: Any, payload: bytes) -> None:
    _rejects(decode, payload)


_NOT_MAPS = {
    "nil": None,
    "int": 1,
    "str": "run",
    "bin": b"\x81\xa1v\x01",
    "list": [VERSION, "run"],
    "float": 1.0,
}


@pytest.mark.parametrize("top", _NOT_MAPS.values(), ids=_NOT_MAPS.keys())
@pytest.mark.parametrize("decode", [decode_request, decode_reply])
def test_top_level_must_be_a_map(decode: Any, top: object) -> None:
    error = _rejects(decode, _pack(top))
    assert "map" in error.message


_BAD_VERSIONS = {"zero": 0, "two": 2, "negative": -1, "string": "1", "nil": None, "list": [1]}


@pytest.mark.parametrize("version", _BAD_VERSIONS.values(), ids=_BAD_VERSIONS.keys())
def test_wrong_version_is_unsupported(version: object) -> None:
    error = _rejects(decode_request, _pack(_run_body(v=version)), ErrorCode.UNSUPPORTED_VERSION)
    assert repr(version) in error.message


@pytest.mark.parametrize("decode", [decode_request, decode_reply])
def test_missing_version_is_unsupported(decode: Any) -> None:
    _rejects(decode, _pack({"kind": "models?"}), ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_of_the_wrong_type_is_unsupported(version: object) -> None:
    _rejects(
        decode_request, _pack({"v": version, "kind": "models?"}), ErrorCode.UNSUPPORTED_VERSION
    )


_REQUEST_BODIES = {"run": _run_body(), "models?": {"v": VERSION, "kind": "models?"}}
_REPLY_BODIES = {
    "result": _result_body(),
    "error": _error_body(),
    "models": _models_body(),
}


@pytest.mark.parametrize("kind", ["", "Run", "runs", "result?", "models!", None, 1, b"run"])
@pytest.mark.parametrize("decode", [decode_request, decode_reply])
def test_unknown_or_missing_kind_is_malformed(decode: Any, kind: object) -> None:
    body = {"v": VERSION} if kind is None else {"v": VERSION, "kind": kind}
    _rejects(decode, _pack(body))


@pytest.mark.parametrize("body", _REPLY_BODIES.values(), ids=_REPLY_BODIES.keys())
def test_a_reply_is_not_a_request(body: dict[str, Any]) -> None:
    decode_reply(_pack(body))  # valid where it belongs
    error = _rejects(decode_request, _pack(body))
    assert repr(body["kind"]) in error.message


@pytest.mark.parametrize("body", _REQUEST_BODIES.values(), ids=_REQUEST_BODIES.keys())
def test_a_request_is_not_a_reply(body: dict[str, Any]) -> None:
    decode_request(_pack(body))  # valid where it belongs
    error = _rejects(decode_reply, _pack(body))
    assert repr(body["kind"]) in error.message


def _decoder_for(kind: str) -> Any:
    return decode_request if kind in _REQUEST_BODIES else decode_reply


_ALL_BODIES = {**_REQUEST_BODIES, **_REPLY_BODIES}
_DROPPABLE = [
    pytest.param(kind, field, id=f"{kind}-{field}")
    for kind, body in _ALL_BODIES.items()
    for field in body
    if field not in ("v", "kind")
]


@pytest.mark.parametrize(("kind", "field"), _DROPPABLE)
def test_missing_field_is_malformed(kind: str, field: str) -> None:
    body = {k: v for k, v in _ALL_BODIES[kind].items() if k != field}
    error = _rejects(_decoder_for(kind), _pack(body))
    assert field in error.message


@pytest.mark.parametrize("kind", _ALL_BODIES)
def test_extra_field_is_malformed(kind: str) -> None:
    body = {**_ALL_BODIES[kind], "priority": 1}
    error = _rejects(_decoder_for(kind), _pack(body))
    assert "priority" in error.message


def _with_tensor(**tensor: Any) -> bytes:
    return _pack(_run_body(inputs={"x": tensor}))


_BAD_REQUESTS = {
    # fields of the wrong type or size
    "job_id-int": _pack(_run_body(job_id=1)),
    "job_id-bytes": _pack(_run_body(job_id=b"job")),
    "job_id-empty": _pack(_run_body(job_id="")),
    "job_id-too-long": _pack(_run_body(job_id="j" * 129)),
    "model_id-nil": _pack(_run_body(model_id=None)),
    "model_id-list": _pack(_run_body(model_id=["m"])),
    "timeout-float": _pack(_run_body(timeout_ms=5.0)),
    "timeout-bool": _pack(_run_body(timeout_ms=True)),
    "timeout-str": _pack(_run_body(timeout_ms="5")),
    "timeout-zero": _pack(_run_body(timeout_ms=0)),
    "timeout-negative": _pack(_run_body(timeout_ms=-1)),
    "timeout-above-max": _pack(_run_body(timeout_ms=MAX_TIMEOUT_MS + 1)),
    "timeout-huge": _pack(_run_body(timeout_ms=2**64 - 1)),
    "timestamp-ext-timeout": _pack(_run_body(timeout_ms=msgpack.Timestamp(5))),
    # the tensors map
    "inputs-list": _pack(_run_body(inputs=[_wire_tensor()])),
    "inputs-nil": _pack(_run_body(inputs=None)),
    "too-many-tensors": _pack(
        _run_body(inputs={f"t{i}": _wire_tensor() for i in range(MAX_TENSORS + 1)})
    ),
    "tensor-name-bytes": _pack(_run_body(inputs={b"x": _wire_tensor()})),
    "tensor-name-too-long": _pack(_run_body(inputs={"x" * 129: _wire_tensor()})),
    "tensor-not-a-map": _pack(_run_body(inputs={"x": [1, 2, 3]})),
    "tensor-missing-data": _with_tensor(dtype="float32", shape=[1]),
    "tensor-extra-key": _with_tensor(dtype="float32", shape=[1], data=bytes(4), order="C"),
    # one tensor
    "dtype-object": _with_tensor(dtype="object", shape=[1], data=bytes(8)),
    "dtype-complex64": _with_tensor(dtype="complex64", shape=[2], data=bytes(16)),
    "dtype-str": _with_tensor(dtype="<U1", shape=[1], data=bytes(4)),
    "dtype-big-endian": _with_tensor(dtype=">f4", shape=[1], data=bytes(4)),
    "dtype-nil": _with_tensor(dtype=None, shape=[1], data=bytes(4)),
    "dtype-int": _with_tensor(dtype=4, shape=[1], data=bytes(4)),
    "shape-not-list": _with_tensor(dtype="float32", shape=4, data=bytes(16)),
    "shape-negative": _with_tensor(dtype="float32", shape=[-1, 2], data=bytes(8)),
    "shape-float": _with_tensor(dtype="float32", shape=[2.0], data=bytes(8)),
    "shape-bool": _with_tensor(dtype="float32", shape=[True], data=bytes(4)),
    "shape-nil-dim": _with_tensor(dtype="float32", shape=[None], data=bytes(4)),
    f"rank-{MAX_RANK + 1}": _with_tensor(dtype="uint8", shape=[1] * (MAX_RANK + 1), data=b"\x00"),
    "data-str": _with_tensor(dtype="uint8", shape=[2], data="ab"),
    "data-list": _with_tensor(dtype="uint8", shape=[2], data=[1, 2]),
    "data-short": _with_tensor(dtype="float32", shape=[2, 3], data=bytes(23)),
    "data-long": _with_tensor(dtype="float32", shape=[2, 3], data=bytes(25)),
    "data-for-wrong-dtype": _with_tensor(dtype="float64", shape=[3], data=bytes(12)),
    "data-for-0d": _with_tensor(dtype="int64", shape=[], data=bytes(4)),
    "data-for-empty": _with_tensor(dtype="int8", shape=[0, 5], data=b"\x00"),
    # extension types anywhere
    "ext-top-level": _pack(msgpack.ExtType(5, b"payload")),
    "ext-job_id": _pack(_run_body(job_id=msgpack.ExtType(1, b"j"))),
    "ext-data": _with_tensor(dtype="uint8", shape=[1], data=msgpack.ExtType(0, b"\x00")),
}


@pytest.mark.parametrize("payload", _BAD_REQUESTS.values(), ids=_BAD_REQUESTS.keys())
def test_bad_run_request_is_malformed(payload: bytes) -> None:
    _rejects(decode_request, payload)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_ms", 0),
        ("timeout_ms", -5),
        ("timeout_ms", MAX_TIMEOUT_MS + 1),
        ("job_id", 7),
    ],
    ids=["timeout-zero", "timeout-negative", "timeout-above-max", "job_id-int"],
)
def test_rejection_names_the_field(field: str, value: object) -> None:
    error = _rejects(decode_request, _pack(_run_body(**{field: value})))
    assert field in error.message


def test_data_length_mismatch_says_what_was_needed() -> None:
    error = _rejects(decode_request, _with_tensor(dtype="float32", shape=[2, 3], data=bytes(7)))
    assert "needs 24 bytes, got 7" in error.message


_BAD_REPLIES = {
    "result-executor-int": _pack(_result_body(executor=1)),
    "result-outputs-list": _pack(_result_body(outputs=[])),
    "result-bad-tensor": _pack(_result_body(outputs={"y": _wire_tensor("float32", [2], b"")})),
    "queue_ms-nan": _pack(_result_body(queue_ms=math.nan)),
    "queue_ms-inf": _pack(_result_body(queue_ms=math.inf)),
    "queue_ms-minus-inf": _pack(_result_body(queue_ms=-math.inf)),
    "queue_ms-negative": _pack(_result_body(queue_ms=-0.5)),
    "queue_ms-str": _pack(_result_body(queue_ms="1")),
    "queue_ms-bool": _pack(_result_body(queue_ms=True)),
    "compute_ms-nan": _pack(_result_body(compute_ms=math.nan)),
    "compute_ms-nil": _pack(_result_body(compute_ms=None)),
    "error-code-str": _pack(_error_body(code="OVERLOADED")),
    "error-code-float": _pack(_error_body(code=7.0)),
    "error-code-bool": _pack(_error_body(code=True)),
    "error-message-int": _pack(_error_body(message=1)),
    "error-message-too-long": _pack(_error_body(message="m" * (MAX_MESSAGE_LENGTH + 1))),
    "error-peer-nil": _pack(_error_body(peer=None)),
    "models-not-list": _pack(_models_body(models={})),
    "models-peer_id-empty": _pack(_models_body(peer_id="")),
    "models-descriptor-not-map": _pack(_models_body(models=["digits-mlp"])),
    "models-descriptor-extra": _pack(_models_body(models=[_models_body()["models"][0] | {"x": 1}])),
    "models-bad-accuracy": _pack(
        _models_body(models=[_models_body()["models"][0] | {"accuracy": 2.0}])
    ),
    "models-too-many": _pack(_models_body(models=_models_body()["models"] * 1025)),
}


@pytest.mark.parametrize("payload", _BAD_REPLIES.values(), ids=_BAD_REPLIES.keys())
def test_bad_reply_is_malformed(payload: bytes) -> None:
    _rejects(decode_reply, payload)


# Found while writing these tests: inputs that escape as something other than WireError.
_ESCAPES = {
    "zero-size-tensor-with-huge-dim": _with_tensor(dtype="float32", shape=[0, 2**62], data=b""),
    "zero-size-tensor-with-uint64-dim": _with_tensor(
        dtype="float32", shape=[0, 2**64 - 1], data=b""
    ),
    "unhashable-dtype-list": _with_tensor(dtype=[], shape=[1], data=bytes(4)),
    "unhashable-dtype-map": _with_tensor(dtype={}, shape=[1], data=bytes(4)),
}


@pytest.mark.parametrize("payload", _ESCAPES.values(), ids=_ESCAPES.keys())
def test_request_that_crashes_the_tensor_decoder_is_malformed(payload: bytes) -> None:
    _rejects(decode_request, payload)


_DESCRIPTOR_ESCAPES = {
    "sha256-int": {"sha256": 5},
    "sha256-nil": {"sha256": None},
    "sha256-bytes": {"sha256": bytes(64)},
    "spec-dtype-list": {"inputs": [{"name": "x", "dtype": [], "shape": [1]}]},
}


@pytest.mark.parametrize("change", _DESCRIPTOR_ESCAPES.values(), ids=_DESCRIPTOR_ESCAPES.keys())
def test_models_reply_with_a_crashing_descriptor_is_malformed(change: dict[str, Any]) -> None:
    descriptor = _models_body()["models"][0] | change
    _rejects(decode_reply, _pack(_models_body(models=[descriptor])))


def test_wire_error_is_a_job_error() -> None:
    error = _rejects(decode_request, b"")
    assert isinstance(error, JobError)
    assert not error.code.retryable


# --- truncation and fuzzing ------------------------------------------------------------

_VALID = {
    "run": (decode_request, encode(_run_request())),
    "models?": (decode_request, encode(ModelsRequest())),
    "result": (decode_reply, encode(_run_reply())),
    "error": (decode_reply, encode(ErrorReply(ErrorCode.OVERLOADED, "busy", "p"))),
    "models": (decode_reply, encode(ModelsReply("p", (_descriptor(),)))),
}


@pytest.mark.parametrize(("decode", "payload"), _VALID.values(), ids=_VALID.keys())
def test_every_strict_prefix_of_a_valid_message_is_malformed(decode: Any, payload: bytes) -> None:
    decode(payload)  # the whole message is valid
    for end in range(len(payload)):
        with pytest.raises(WireError) as caught:
            decode(payload[:end])
        assert caught.value.code is MALFORMED, (end, caught.value)


def _valid_or_wire_error(decode: Any, payload: bytes, valid: tuple[type, ...]) -> None:
    try:
        message = decode(payload)
    except WireError as error:
        assert isinstance(error.code, ErrorCode)
    else:
        assert isinstance(message, valid)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_wire_error(payload: bytes) -> None:
    _valid_or_wire_error(decode_request, payload, (RunRequest, ModelsRequest))
    _valid_or_wire_error(decode_reply, payload, (InferenceResult, ErrorReply, ModelsReply))


_RUN_PAYLOAD = _VALID["run"][1]
# A str header turned into a fixarray header: dtype "float32" arrives as a list of 7 ints.
_DTYPE_AS_LIST = (_RUN_PAYLOAD.index(b"\xa7float32"), 0x97)


@settings(max_examples=300, deadline=None)
@example(index=_DTYPE_AS_LIST[0], byte=_DTYPE_AS_LIST[1])
@given(index=st.integers(0, len(_RUN_PAYLOAD) - 1), byte=st.integers(0, 255))
def test_single_byte_mutations_of_a_run_request_decode_or_raise_wire_error(
    index: int, byte: int
) -> None:
    payload = bytearray(_RUN_PAYLOAD)
    payload[index] = byte
    _valid_or_wire_error(decode_request, bytes(payload), (RunRequest, ModelsRequest))


def test_every_message_kind_round_trips_through_its_decoder() -> None:
    """Each request and reply kind is accepted by its decoder (a new kind must be added)."""
    from p2p_node._messages import PeersReply, PeersRequest

    for message in (ModelsRequest(), PeersRequest()):
        assert decode_request(encode(message)) == message
    assert decode_reply(encode(PeersReply("peer", ()))) == PeersReply("peer", ())


def test_a_run_request_names_the_outputs_it_wants_only_when_it_wants_some() -> None:
    some = RunRequest("j", "m", {"x": np.zeros(2, np.float32)}, 10, outputs=("b", "a"))
    decoded = decode_request(encode(some))
    assert isinstance(decoded, RunRequest) and decoded.outputs == ("b", "a")
    every = replace(some, outputs=())
    assert "outputs" not in msgpack.unpackb(encode(every))  # what older nodes read
    decoded = decode_request(encode(every))
    assert isinstance(decoded, RunRequest) and decoded.outputs == ()


@pytest.mark.parametrize(
    ("changes", "in_message"),
    [
        ({"outputs": "label"}, "outputs must be a list"),
        ({"outputs": []}, "outputs must be a list of 1 to"),
        ({"outputs": ["label", 3]}, "output name must be a string"),
        ({"outputs": ["label", ""]}, "output name must be 1 to"),
        ({"outputs": ["label", "label"]}, "names one output twice"),
        ({"outputs": ["o"] * 65}, "outputs must be a list of 1 to 64"),
        ({"outputs": ["label"], "model_id": "", "task": "t"}, "outputs go with a model_id"),
    ],
    ids=["str", "empty", "int", "empty-name", "twice", "too-many", "with-task"],
)
def test_bad_output_names_are_malformed(changes: dict[str, Any], in_message: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_request(msgpack.packb(_run_body(**changes), use_bin_type=True))
    assert caught.value.code == ErrorCode.MALFORMED_MESSAGE
    assert in_message in caught.value.message


@pytest.mark.parametrize(
    ("changes", "in_message"),
    [
        ({"strategy": "fastest"}, "unknown strategy 'fastest'"),
        ({"strategy": 3}, "unknown strategy 3"),
        ({"requires": {"min_memory_mb": -1, "gpu": "any", "provider": None}}, "min_memory_mb"),
        ({"requires": {"min_memory_mb": 0, "gpu": "lots", "provider": None}}, "gpu must be"),
        ({"requires": {"min_memory_mb": 0, "gpu": "any"}}, "missing fields ['provider']"),
    ],
    ids=["unknown-strategy", "strategy-int", "negative-memory", "bad-gpu", "missing-provider"],
)
def test_placement_fields_of_a_run_request_are_checked(changes, in_message: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_request(msgpack.packb(_run_body(**changes), use_bin_type=True))
    assert caught.value.code == ErrorCode.MALFORMED_MESSAGE
    assert in_message in caught.value.message


def test_place_messages_round_trip() -> None:
    from p2p_node._messages import PlaceReply, PlaceRequest
    from scheduler import (
        Candidate,
        DistributionStrategy,
        Excluded,
        GpuNeed,
        Placement,
        Requirements,
    )

    request = PlaceRequest(
        "m", DistributionStrategy.CAPABILITY_BASED, Requirements(512, GpuNeed.REQUIRED)
    )
    placement = Placement("m", (Candidate("a", -1.5, "capacity"),), (Excluded("b", "no GPU"),))
    assert decode_request(encode(request)) == request
    assert decode_reply(encode(PlaceReply("me", placement))) == PlaceReply("me", placement)
