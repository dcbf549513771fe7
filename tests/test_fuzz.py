"""Fuzzing every decoder and handler with hypothesis.

The property everywhere: bytes from a peer either decode to a valid value or
raise the decoder's own typed error; nothing else escapes. The last tests send
the same kinds of bytes to a real node over real libp2p and check that every
request gets a typed error reply (or a clean close where framing is broken)
and that the node still runs a valid job afterwards.

Fast by default; `HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py
--hypothesis-show-statistics` runs 10,000 cases per test (see conftest.py).
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from test_record import REALISTIC

from gossip import TENSOR_DTYPES, ModelDescriptor, RecordError, check_record, decode_record
from gossip import encode_record as encode_gossip_record
from p2p_node import Client, ErrorCode, NodeConfig, bundled_models_dir
from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._config import parse_peer_multiaddr
from p2p_node._executor import load_model, validate_inputs
from p2p_node._framing import FrameBuffer, FrameError, encode_frame
from p2p_node._messages import (
    ErrorReply,
    FeedbackReply,
    FeedbackRequest,
    Learned,
    LoadReply,
    LoadRequest,
    ModelsReply,
    ModelsRequest,
    PeerReport,
    PeersReply,
    PeersRequest,
    PlaceReply,
    PlaceRequest,
    RunRequest,
    SelectReply,
    SelectRequest,
    WireError,
)
from p2p_node._repository import read_repository
from p2p_node._rpc import (
    INFER_PROTOCOL,
    JOB_PROTOCOL,
    LOAD_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    PLACE_PROTOCOL,
    SELECT_PROTOCOL,
    new_libp2p_host,
    run_host,
)
from p2p_node.testing import open_swarm
from scheduler import (
    Candidate,
    DistributionStrategy,
    Excluded,
    InferenceResult,
    JobError,
    Placement,
)
from selection import AdvancedModelSelectionStrategy, LeftOut, RankedModel, Selection

# --- what a hostile peer can send -------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()  # NaN and inf included
    | st.text(max_size=20)
    | st.binary(max_size=64)
)
msgpack_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def _nested(depth: int, leaf: bytes = b"\xc0") -> bytes:
    """`depth` nested one-element msgpack arrays around `leaf` (nil)."""
    return b"\x91" * depth + leaf


# Headers that announce far more than follows: str32, bin32, array32, map32, ext32.
_HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff"]
_HUGE_HEADERS += [b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01"]

raw_payloads = st.one_of(
    st.binary(max_size=512),
    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.integers(min_value=1, max_value=200_000).map(_nested),
    st.sampled_from(_HUGE_HEADERS).flatmap(lambda h: st.binary(max_size=16).map(h.__add__)),
)


def _valid_messages() -> list[bytes]:
    """One valid encoding of every message kind, for mutating."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    descriptor = REALISTIC.models[0].descriptor
    placement = Placement("m", (Candidate("p", 1.5, "why"),), (Excluded("q", "down"),))
    messages: list[Any] = [
        RunRequest("job", "digits-mlp", {"input": x, "mask": np.array([True])}, 5000),
        RunRequest("job", "m", {"": x}, 1, DistributionStrategy.ROUND_ROBIN),
        RunRequest("job", "digits-mlp", {"input": x}, 5000, outputs=("label", "probabilities")),
        PlaceRequest("digits-mlp", DistributionStrategy.LATENCY_OPTIMIZED),
        ModelsRequest(),
        PeersRequest(),
        InferenceResult("job", "m", {"label": np.array([1, 2])}, "peer", 0.5, 1.0),
        ErrorReply(ErrorCode.OVERLOADED, "busy", "peer", retry_after=0.5),
        ModelsReply("peer", (descriptor,)),
        PeersReply("peer", (PeerReport(REALISTIC, 0.5, "alive"),)),
        PlaceReply("peer", placement),
        RunRequest("job", "", {"input": x}, 5000, task="image-classification", context={"a": 1.5}),
        SelectRequest("image-classification", "hybrid", {"language": "en"}, 3),
        SelectReply(
            "peer",
            Selection(
                AdvancedModelSelectionStrategy.HYBRID,
                "t",
                "*",
                (RankedModel("m", 0.5, ("why",)),),
                (LeftOut("n", "why not"),),
            ),
            (Learned("m", "*", 1, 0, 2.0, 1.0, None, 0.0),),
        ),
        FeedbackRequest("job", 0.5),
        FeedbackReply("peer", "job", ("m",)),
        InferenceResult("job", "m", {"label": np.array([1])}, "p", 0.5, 1.0, (("m", 1),)),
        InferenceResult("job", "m", {"label": np.array([1])}, "p", 0.5, 1.0, load=3),
        LoadRequest(),
        LoadReply("peer", 1, 4),
    ]
    return [encode(m) for m in messages]


VALID_MESSAGES = _valid_messages()


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` unpacked, with one to three fields replaced, dropped or added, packed again."""
    value = msgpack.unpackb(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(value))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if not path:
            value = draw(msgpack_values) if action == "replace" else value
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = draw(msgpack_values | st.sampled_from([math.nan, -math.inf]))
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(msgpack_values)
        else:
            parent.append(draw(msgpack_values))
    return msgpack.packb(value, use_bin_type=True)


def _truncated(base: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(base) - 1).map(lambda n: base[:n])


hostile_messages = st.one_of(
    raw_payloads,
    st.sampled_from(VALID_MESSAGES).flatmap(mutated),
    st.sampled_from(VALID_MESSAGES).flatmap(_truncated),
)

# --- the wire codec -------------------------------------------------------------------


@given(hostile_messages)
def test_decode_request_returns_a_request_or_raises_wire_error(payload: bytes) -> None:
    try:
        request = decode_request(payload)
    except WireError as error:
        assert isinstance(error.code, ErrorCode) and "\n" not in error.message
        return
    decode_request(encode(request))  # what we accept, we can send on


@given(hostile_messages)
def test_decode_reply_returns_a_reply_or_raises_wire_error(payload: bytes) -> None:
    try:
        reply = decode_reply(payload)
    except WireError as error:
        assert isinstance(error.code, ErrorCode) and "\n" not in error.message
        return
    decode_reply(encode(reply))


@st.composite
def wire_tensors(draw: st.DrawFn) -> dict[str, Any]:
    """A tensor map as a peer might send it: dtype, shape and data each maybe wrong."""
    dtype = draw(st.sampled_from(sorted(TENSOR_DTYPES)) | st.text(max_size=10) | msgpack_values)
    shape = draw(
        st.lists(st.integers(0, 4) | st.integers(-(2**63), 2**64 - 1) | msgpack_values, max_size=40)
        | msgpack_values
    )
    if isinstance(dtype, str) and dtype in TENSOR_DTYPES and draw(st.booleans()):
        values = st.floats(allow_nan=True, allow_infinity=True, width=32)
        size = draw(st.integers(0, 12))
        with np.errstate(all="ignore"):
            data = np.array(draw(st.lists(values, min_size=size, max_size=size))).astype(dtype)
        payload: Any = data.tobytes()
    else:
        payload = draw(st.binary(max_size=64) | msgpack_values)
    return {"t": {"dtype": dtype, "shape": shape, "data": payload}}


@given(wire_tensors())
# Empty, but the other dims' product past what numpy can hold: it raised ValueError.
@example(tensors={"t": {"dtype": "bool", "shape": [0, 2**21, 2**21, 2**21], "data": b""}})
def test_tensors_decode_to_their_declared_shape_or_are_malformed(tensors: dict) -> None:
    body = msgpack.unpackb(VALID_MESSAGES[0])
    body["inputs"] = tensors
    try:
        request = decode_request(msgpack.packb(body, use_bin_type=True))
    except WireError as error:
        assert error.code == ErrorCode.MALFORMED_MESSAGE
        return
    assert isinstance(request, RunRequest)
    (array,) = request.inputs.values()
    assert list(array.shape) == tensors["t"]["shape"]
    assert array.dtype.name == tensors["t"]["dtype"]


@pytest.mark.parametrize("depth", [10, 1_000, 100_000, 1_000_000])
def test_deeply_nested_msgpack_is_malformed(depth: int) -> None:
    # A run request whose last field, job_id, holds the nesting.
    prefix = msgpack.packb({"v": 1, "kind": "run", "job_id": None})[:-1]
    for payload in (_nested(depth), prefix + _nested(depth)):
        for decode in (decode_request, decode_reply):
            with pytest.raises(WireError) as caught:
                decode(payload)
            assert caught.value.code == ErrorCode.MALFORMED_MESSAGE


# --- framing --------------------------------------------------------------------------


@given(
    stream=st.binary(max_size=256)
    | st.lists(st.binary(max_size=64), max_size=4).map(
        lambda frames: b"".join(encode_frame(f) for f in frames)
    ),
    garbage=st.binary(max_size=32),
    cuts=st.lists(st.integers(1, 40), max_size=20),
)
def test_frames_are_whole_or_the_stream_is_refused(
    stream: bytes, garbage: bytes, cuts: list[int]
) -> None:
    data = stream + garbage
    buffer = FrameBuffer(max_frame=100)
    position = 0
    for cut in [*cuts, len(data)]:
        buffer.feed(data[position : position + cut])
        position += cut
        try:
            while (frame := buffer.next_frame()) is not None:
                assert len(frame) <= 100
        except FrameError as error:
            assert isinstance(error.too_large, bool)
            return
    assert len(buffer) < len(data) + 1


@given(length=st.integers(101, 2**63 - 1))
def test_a_huge_declared_length_is_refused_before_its_body(length: int) -> None:
    buffer = FrameBuffer(max_frame=100)
    buffer.feed(encode_frame(b"")[:0] + _varint(length))
    with pytest.raises(FrameError) as caught:
        buffer.next_frame()
    assert caught.value.too_large


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# --- gossip records -------------------------------------------------------------------

RECORD = encode_gossip_record(REALISTIC)
hostile_records = st.one_of(raw_payloads, mutated(RECORD), _truncated(RECORD))


@given(hostile_records)
def test_decode_record_returns_a_record_or_raises_record_error(data: bytes) -> None:
    try:
        record = decode_record(data)
    except RecordError:
        return
    assert decode_record(encode_gossip_record(record)) == record


@given(hostile_records, st.sampled_from([REALISTIC.peer_id, "someone-else"]), st.booleans())
def test_check_record_accepts_or_says_why_not(data: bytes, signer: str, seen: bool) -> None:
    try:
        record = check_record(data, signer, REALISTIC if seen else None)
    except RecordError as error:
        assert error.reason is not None
        return
    assert record.peer_id == signer


# --- executor input validation ------------------------------------------------------------

_CARDS = read_repository(bundled_models_dir())
_SINGLE_INPUT = [c for c in _CARDS if c.id in ("digits-mlp", "cancer-logreg")]


@pytest.fixture(scope="module")
def loaded_models() -> dict[str, Any]:
    from p2p_node import ExecutorConfig

    return {c.id: load_model(c, ExecutorConfig(use_gpu=False)) for c in _SINGLE_INPUT}


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(sorted(TENSOR_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4) | st.sampled_from([30, 64]), max_size=3))
    size = math.prod(shape)
    specials = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e300, -1e-300])
    values = draw(st.lists(st.floats(width=64) | specials, min_size=1, max_size=8))
    with np.errstate(all="ignore"):  # the values repeat to fill the shape
        return np.resize(np.array(values, dtype=np.float64), size).astype(dtype).reshape(shape)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model_id=st.sampled_from([c.id for c in _SINGLE_INPUT]),
    names=st.lists(st.sampled_from(["", "input", "other"]), min_size=0, max_size=2, unique=True),
    data=st.data(),
)
def test_validated_inputs_run_and_others_are_invalid_input(
    loaded_models: dict[str, Any], model_id: str, names: list[str], data: st.DataObject
) -> None:
    model = loaded_models[model_id]
    descriptor: ModelDescriptor = model.descriptor
    inputs = {name: data.draw(arrays()) for name in names}
    try:
        feeds = validate_inputs(descriptor, inputs)
    except JobError as error:
        assert error.code == ErrorCode.INVALID_INPUT and "\n" not in error.message
        return
    # Whatever passes validation must run: NaN and inf are values, not errors.
    with np.errstate(all="ignore"):
        outputs = model.session.run(None, feeds)
    assert len(outputs) == len(descriptor.outputs)


# --- a real node over real libp2p -----------------------------------------------------

PROTOCOLS = [
    JOB_PROTOCOL,
    INFER_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    PLACE_PROTOCOL,
    SELECT_PROTOCOL,
    LOAD_PROTOCOL,
]
CASE_TIMEOUT_S = 20.0


class NodeUnderFire:
    """A real node and a raw libp2p host, in a trio loop on a thread of their own, so
    that hypothesis (synchronous) can drive one exchange per case."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.errors: list[logging.LogRecord] = []

    def __enter__(self) -> NodeUnderFire:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the node under fire did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        with tempfile.TemporaryDirectory() as tmp:
            base = NodeConfig(data_dir=Path(tmp), shutdown_grace=1.0, target_degree=0)
            async with open_swarm(1, base=base) as swarm:
                self.node = swarm[0]
                self.raw = new_libp2p_host(create_new_key_pair())
                async with run_host(self.raw, []):
                    target = parse_peer_multiaddr(self.node.addrs[0])
                    await self.raw.connect(info_from_p2p_addr(target))
                    self._ready.set()
                    await self._stop.wait()

    def send(self, protocol: str, data: bytes, *, half_close: bool = False) -> bytes | None:
        """Open a stream, write `data`, and return the first reply frame (None: closed)."""
        return trio.from_thread.run(self._send, protocol, data, half_close, trio_token=self._token)

    async def _send(self, protocol: Any, data: bytes, half_close: bool) -> bytes | None:
        with trio.fail_after(CASE_TIMEOUT_S):
            stream = await self.raw.new_stream(ID.from_base58(self.node.peer_id), [protocol])
            try:
                await stream.write(data)
                if half_close:
                    await stream.close()
                buffer = FrameBuffer(max_frame=1 << 24)
                while (frame := buffer.next_frame()) is None:
                    try:
                        chunk = await stream.read(65536)
                    except Exception:  # reset or closed: what broken framing ends in
                        return None
                    if not chunk:
                        return None
                    buffer.feed(chunk)
                return frame
            finally:
                with trio.CancelScope(shield=True):
                    await stream.reset()

    def submit_valid_job(self) -> InferenceResult:
        return trio.from_thread.run(self._submit_valid_job, trio_token=self._token)

    async def _submit_valid_job(self) -> InferenceResult:
        with trio.fail_after(CASE_TIMEOUT_S):
            async with Client.connect(self.node.addrs[0]) as client:
                x = np.zeros((1, 64), np.float32)
                return await client.submit("digits-mlp", {"input": x})


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def node_under_fire() -> Iterator[NodeUnderFire]:
    errors = _Errors()
    logging.getLogger("p2p_node").addHandler(errors)
    try:
        with NodeUnderFire() as harness:
            harness.errors = errors.records
            yield harness
    finally:
        logging.getLogger("p2p_node").removeHandler(errors)


def _expect_typed_reply(frame: bytes | None) -> None:
    assert frame is not None, "a well-framed request got no reply"
    reply = decode_reply(frame)  # a node only ever sends valid replies
    if isinstance(reply, ErrorReply):
        assert reply.code != ErrorCode.INTERNAL, reply.message  # INTERNAL: a handler crashed


def test_every_well_framed_request_gets_a_typed_reply(node_under_fire: NodeUnderFire) -> None:
    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(protocol=st.sampled_from(PROTOCOLS), payload=hostile_messages)
    def case(protocol: str, payload: bytes) -> None:
        _expect_typed_reply(node_under_fire.send(protocol, encode_frame(payload)))

    case()
    assert node_under_fire.submit_valid_job().outputs["label"].shape == (1,)
    assert not node_under_fire.errors, [r.getMessage() for r in node_under_fire.errors]


@st.composite
def broken_frames(draw: st.DrawFn) -> tuple[bytes, bool, ErrorCode | None]:
    """(bytes, half-close after them, the error reply expected or None for a plain close)."""
    kind = draw(st.sampled_from(["truncated", "huge", "endless-prefix"]))
    if kind == "truncated":
        payload = draw(st.binary(min_size=1, max_size=300) | st.sampled_from(VALID_MESSAGES))
        cut = draw(st.integers(0, len(payload) - 1))
        return encode_frame(payload)[: len(encode_frame(payload)) - len(payload) + cut], True, None
    if kind == "huge":
        length = draw(st.integers(16 * 1024 * 1024 + 1, 2**63 - 1))
        return _varint(length) + draw(st.binary(max_size=32)), False, ErrorCode.MESSAGE_TOO_LARGE
    prefix = b"\x80" * draw(st.integers(9, 40))
    return prefix + draw(st.binary(max_size=8)), False, ErrorCode.MALFORMED_MESSAGE


def test_broken_framing_gets_a_typed_error_or_a_clean_close(
    node_under_fire: NodeUnderFire,
) -> None:
    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(protocol=st.sampled_from(PROTOCOLS), broken=broken_frames())
    def case(protocol: str, broken: tuple[bytes, bool, ErrorCode | None]) -> None:
        data, half_close, expected = broken
        frame = node_under_fire.send(protocol, data, half_close=half_close)
        if expected is None:
            assert frame is None
        else:
            assert frame is not None
            reply = decode_reply(frame)
            assert isinstance(reply, ErrorReply) and reply.code == expected

    case()
    assert node_under_fire.submit_valid_job().outputs["label"].shape == (1,)
    assert not node_under_fire.errors, [r.getMessage() for r in node_under_fire.errors]
