"""Serving a stage of a chain: the stage protocol.

A chain runs a model split into stages (see `_shard`) on one peer per stage.
The coordinator opens a stream to the first stage's peer and sends it a
`StageStep`: the remaining hops of the chain (peer and stage model id each),
the coordinator and session to answer, and the tensors. That peer runs its
stage (and any consecutive stages it also serves, without a hop), opens a
stream to the next hop's peer, and sends it the step with the activations the
later stages take: activations go peer to peer, never back through the
coordinator. The last stage sends its answer (the parent's outputs: logits, an
embedding) straight to the coordinator on the stage-answer protocol; up the
chain, the streams carry only failures.

A stream is a session: a decoder stage keeps its own layers' cache
(`past_key_values.*` in, `present.*` out) for the stream's life, so each decode
step of a generation sends only the new token down the chain, and a hang-up
anywhere frees the caches of every stage after it. A peer that cannot reach
the next hop answers `StageFailure` naming that peer, so that the coordinator
replaces it (see `_chain`).

Frames: msgpack maps. Tensors: ``{name: [dtype, shape, bytes]}``, little-endian.
Everything from a peer is checked; a bad frame is a typed error, never a crash.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import onnxruntime as ort
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from scheduler import ErrorCode, JobError

from ._channel import TRANSPORT_ERRORS, Channel
from ._config import ConfigError
from ._decoder import PAST_PREFIX, PRESENT_PREFIX
from ._framing import FrameError
from ._repository import ModelCard, StageSpec

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

STAGE_PROTOCOL = TProtocol("/p2p-node/stage/1.0.0")
# /1.1.0: as /1.0.0, and the first step carries the sender's key for the session
# ("k"), so that the decode steps of many sessions that ran as one batch go on to the
# next peer as one frame of rows (`StageRows`), on any one of their streams.
STAGE_BATCH_PROTOCOL = TProtocol("/p2p-node/stage/1.1.0")
ANSWER_PROTOCOL = TProtocol("/p2p-node/stage-answer/1.0.0")
# /1.1.0: as /1.0.0, and a frame may be the answers of several of the coordinator's
# sessions (`encode_answer_rows`), a batch's, on any one of their streams.
ANSWER_BATCH_PROTOCOL = TProtocol("/p2p-node/stage-answer/1.1.0")
MAX_HOPS = 16
MAX_STAGE_TENSORS = 256
MAX_ROWS = 256  # sessions in one frame of rows
STEP_WAIT_S = 300.0  # a session's next step (a client reading slowly)
HOP_DIAL_S = 5.0
GATHER_S = 0.002  # the most a decode step waits for others to join its batch
GATHER_RUNS = 1.0  # ... and at most this many of the stage's runs' time
DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"})

Array = np.ndarray[Any, Any]


# --- wire -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hop:
    """One stage of the chain: the peer that runs it, and the stage's model id."""

    peer_id: str
    model_id: str


@dataclass(slots=True)
class StageStep:
    """A step of a chain, sent to the peer of `hops[0]`. `hops` is set on a stream's
    first step only. `last_only`: answer only the last position of `logits`."""

    tensors: dict[str, Array]
    hops: tuple[Hop, ...] = ()
    last_only: bool = False
    reply: tuple[str, str] | None = None  # first step: (coordinator, session id)
    key: int | None = None  # first step on /1.1.0: the sender's key for the session


@dataclass(slots=True)
class StageRows:
    """Decode steps of several sessions from one peer in one frame (/1.1.0 only): each
    row is the sender's key of a session (its first step's `key`) and its tensors."""

    rows: list[tuple[int, dict[str, Array]]]
    last_only: bool = False


@dataclass(frozen=True, slots=True)
class StageFailure:
    """What went wrong in a chain, and at which peer (empty: no peer to blame)."""

    code: ErrorCode
    message: str
    peer_id: str = ""

    def error(self) -> JobError:
        return JobError(self.code, self.message)


def _tensors_to_wire(tensors: Mapping[str, Array]) -> dict[str, list[Any]]:
    wire = {}
    for name, array in tensors.items():
        a = np.ascontiguousarray(array)
        if a.dtype.name not in DTYPES:
            raise JobError(ErrorCode.INVALID_INPUT, f"tensor {name!r}: dtype {a.dtype} not sent")
        wire[name] = [a.dtype.name, list(a.shape), a.astype(a.dtype.newbyteorder("<")).tobytes()]
    return wire


def _tensors_from_wire(raw: object) -> dict[str, Array]:
    if not isinstance(raw, dict) or len(raw) > MAX_STAGE_TENSORS:
        raise ValueError(f"tensors must be a map of at most {MAX_STAGE_TENSORS}")
    out = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, list) or len(value) != 3:
            raise ValueError("a tensor is [dtype, shape, bytes] under its name")
        dtype, shape, data = value
        if dtype not in DTYPES or not isinstance(data, bytes) or not isinstance(shape, list):
            raise ValueError(f"tensor {name!r}: bad dtype, shape or data")
        if len(shape) > 8 or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        kind = np.dtype(dtype).newbyteorder("<")
        if int(np.prod(shape, dtype=np.int64)) * kind.itemsize != len(data):
            raise ValueError(f"tensor {name!r}: {len(data)} bytes for shape {shape}")
        out[name] = np.frombuffer(data, kind).reshape(shape).astype(kind.newbyteorder("="))
    return out


def encode_step(step: StageStep, limit: int) -> bytes:
    """A step's frame; JobError(MESSAGE_TOO_LARGE) naming `limit` if it is larger."""
    body: dict[str, Any] = {"t": _tensors_to_wire(step.tensors)}
    if step.hops:
        body["hops"] = [[h.peer_id, h.model_id] for h in step.hops]
    if step.last_only:
        body["last"] = True
    if step.reply is not None:
        body["reply"] = list(step.reply)
    if step.key is not None:
        body["k"] = step.key
    return _limited(body, limit)


def encode_rows(rows: StageRows, limit: int) -> bytes:
    """A frame of rows; JobError(MESSAGE_TOO_LARGE) naming `limit` if it is larger."""
    body: dict[str, Any] = {"rows": [[k, _tensors_to_wire(t)] for k, t in rows.rows]}
    if rows.last_only:
        body["last"] = True
    return _limited(body, limit)


def _limited(body: dict[str, Any], limit: int) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > limit:
        raise JobError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"activations of {len(payload):,} bytes exceed the request size limit of "
            f"{limit:,} bytes (max_request_bytes, --max-request-bytes)",
        )
    return payload


def _key(value: object) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError("a session's key is an int in [0, 2**63)")
    return value


def decode_frame(payload: bytes, batch: bool) -> StageStep | StageRows:
    """A step, or (`batch`: on /1.1.0) a frame of rows. Raises ValueError for anything
    else."""
    raw = _unpack(payload)
    if not batch or "rows" not in raw:
        return decode_step(payload, batch, raw)
    if set(raw) - {"rows", "last"}:
        raise ValueError(f"a frame of rows has fields rows, last; got {sorted(raw)}")
    rows_raw, last = raw["rows"], raw.get("last", False)
    if not isinstance(rows_raw, list) or not 0 < len(rows_raw) <= MAX_ROWS:
        raise ValueError(f"rows must be a list of 1 to {MAX_ROWS}")
    if type(last) is not bool:
        raise ValueError("last must be a bool")
    rows = []
    for row in rows_raw:
        if not isinstance(row, list) or len(row) != 2:
            raise ValueError("a row is [session key, tensors]")
        rows.append((_key(row[0]), _tensors_from_wire(row[1])))
    if len({k for k, _ in rows}) != len(rows):
        raise ValueError("a session has one row in a frame")
    return StageRows(rows, last)


def decode_step(
    payload: bytes, batch: bool = False, raw: dict[str, Any] | None = None
) -> StageStep:
    """Raises ValueError for anything but a well-formed step (with a key: `batch`)."""
    raw = _unpack(payload) if raw is None else raw
    fields = {"t", "hops", "last", "reply"} | ({"k"} if batch else set())
    if set(raw) - fields or "t" not in raw:
        raise ValueError(f"a stage step has fields t, hops, last, reply; got {sorted(raw)}")
    hops_raw = raw.get("hops", [])
    if not isinstance(hops_raw, list) or len(hops_raw) > MAX_HOPS:
        raise ValueError(f"hops must be a list of at most {MAX_HOPS}")
    hops = []
    for hop in hops_raw:
        if (
            not isinstance(hop, list)
            or len(hop) != 2
            or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in hop)
        ):
            raise ValueError("a hop is [peer id, stage model id]")
        hops.append(Hop(hop[0], hop[1]))
    last = raw.get("last", False)
    if type(last) is not bool:
        raise ValueError("last must be a bool")
    reply = raw.get("reply")
    if reply is not None and (
        not isinstance(reply, list)
        or len(reply) != 2
        or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in reply)
    ):
        raise ValueError("reply is [coordinator peer id, session id]")
    return StageStep(
        _tensors_from_wire(raw["t"]),
        tuple(hops),
        last,
        (reply[0], reply[1]) if reply else None,
        _key(raw["k"]) if "k" in raw else None,
    )


def encode_answer(answer: dict[str, Array] | StageFailure, limit: int) -> bytes:
    if isinstance(answer, StageFailure):
        body: dict[str, Any] = {"err": int(answer.code), "msg": answer.message[:1000]}
        if answer.peer_id:
            body["peer"] = answer.peer_id
    else:
        body = {"t": _tensors_to_wire(answer)}
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    if len(payload) > limit:
        return encode_answer(
            StageFailure(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the chain's answer of {len(payload):,} bytes exceeds the reply size limit of "
                f"{limit:,} bytes (max_reply_bytes)",
            ),
            limit,
        )
    return payload


def encode_answer_rows(rows: Sequence[tuple[str, dict[str, Array]]], limit: int) -> bytes:
    """The answers of several sessions in one frame (stage-answer /1.1.0); JobError
    (MESSAGE_TOO_LARGE) if larger than `limit`."""
    return _limited({"rows": [[sid, _tensors_to_wire(t)] for sid, t in rows]}, limit)


def decode_answer_rows(raw: dict[str, Any]) -> list[tuple[str, dict[str, Array]]]:
    """Raises ValueError for anything but well-formed rows of answers."""
    rows_raw = raw["rows"]
    if set(raw) != {"rows"} or not isinstance(rows_raw, list):
        raise ValueError("rows of answers are a map of rows alone")
    if not 0 < len(rows_raw) <= MAX_ROWS:
        raise ValueError(f"rows must be a list of 1 to {MAX_ROWS}")
    rows = []
    for row in rows_raw:
        if not isinstance(row, list) or len(row) != 2:
            raise ValueError("a row is [session id, tensors]")
        if not isinstance(row[0], str) or not 0 < len(row[0]) <= 128:
            raise ValueError("a session id is a string")
        rows.append((row[0], _tensors_from_wire(row[1])))
    return rows


def decode_answer(
    payload: bytes, raw: dict[str, Any] | None = None
) -> dict[str, Array] | StageFailure:
    """Raises ValueError for anything but a well-formed answer (`raw`: unpacked)."""
    raw = _unpack(payload) if raw is None else raw
    if "t" in raw and set(raw) == {"t"}:
        return _tensors_from_wire(raw["t"])
    if set(raw) - {"err", "msg", "peer"} or "err" not in raw:
        raise ValueError(f"a stage answer has t, or err, msg and peer; got {sorted(raw)}")
    try:
        code = ErrorCode(raw["err"])
    except ValueError:
        code = ErrorCode.INTERNAL
    msg, peer = raw.get("msg", ""), raw.get("peer", "")
    if not isinstance(msg, str) or not isinstance(peer, str) or len(peer) > 128:
        raise ValueError("msg and peer must be strings")
    return StageFailure(code, msg, peer)


def _unpack(payload: bytes) -> dict[str, Any]:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise ValueError(f"not msgpack: {error or type(error).__name__}") from None
    if not isinstance(raw, dict):
        raise ValueError("a stage frame must be a map")
    return raw


# --- running a stage ------------------------------------------------------------------------


@dataclass(slots=True)
class StageState:
    """One session's cache at one stage: `past_key_values.*` as the stage takes them."""

    past: dict[str, Array] = field(default_factory=dict)


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, Array]:
    """Zero-length caches for each `past_key_values.*` input of `session`."""
    past = {}
    for arg in session.get_inputs():
        if arg.name.startswith(PAST_PREFIX):
            dims = [d if isinstance(d, int) else 0 for d in arg.shape]
            dims[0] = batch
            past[arg.name] = np.zeros(dims, np.float32)
    return past


def _run(
    session: ort.InferenceSession, spec: StageSpec, feeds: dict[str, Array]
) -> dict[str, Array]:
    """The stage's outputs by name; a failed run is the request's INVALID_INPUT."""
    try:
        values = session.run(list(spec.outputs), feeds)
    except Exception as error:  # onnxruntime's errors share no useful base
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"stage {spec.index + 1} failed: {type(error).__name__}: {error}",
        ) from None
    return dict(zip(spec.outputs, values, strict=True))


def run_stage(
    session: ort.InferenceSession,
    spec: StageSpec,
    received: Mapping[str, Array],
    state: StageState | None,
    last_only: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Run one stage (in a worker thread): what goes on to the next stage, and the
    parent's outputs this stage makes (the last stage's answer). Updates `state`'s
    cache. Raises JobError(INVALID_INPUT) for missing inputs."""
    feeds = {}
    for name in spec.inputs:
        if name.startswith(PAST_PREFIX):
            continue
        if name not in received:
            raise JobError(ErrorCode.INVALID_INPUT, f"stage {spec.index + 1} needs tensor {name!r}")
        feeds[name] = received[name]
    if any(n.startswith(PAST_PREFIX) for n in spec.inputs):
        if state is None:
            state = StageState()
        if not state.past:
            rows = next(iter(feeds.values())).shape[0] if feeds else 1
            state.past = empty_past(session, rows)
        feeds.update({n: state.past[n] for n in spec.inputs if n.startswith(PAST_PREFIX)})
    made = _run(session, spec, feeds)
    if state is not None:
        for name, value in made.items():
            if name.startswith(PRESENT_PREFIX):
                state.past[PAST_PREFIX + name[len(PRESENT_PREFIX) :]] = value
    forward = {}
    for name in spec.boundary_out:
        forward[name] = made[name] if name in made else received[name]
    final = {
        n: v
        for n, v in made.items()
        if n not in spec.boundary_out and not n.startswith(PRESENT_PREFIX)
    }
    if last_only and "logits" in final:
        final["logits"] = np.ascontiguousarray(final["logits"][:, -1:, :])
    return forward, final


def decode_rows(spec: StageSpec, received: Mapping[str, Array], state: StageState) -> int:
    """The cache length of `state` if `received` is one session's decode step that may
    share a batch (one row; one position, or as many as the cache plus one, as a mask
    has); else -1."""
    if not state.past or not any(n.startswith(PAST_PREFIX) for n in spec.inputs):
        return -1
    length = int(next(iter(state.past.values())).shape[-2])
    for name in spec.inputs:
        if name.startswith(PAST_PREFIX):
            continue
        value = received.get(name)
        if value is None or value.ndim < 2 or value.shape[0] != 1:
            return -1
        if value.shape[1] != 1 and value.shape[-1] != length + 1:
            return -1
    return length


def batch_key(spec: StageSpec, received: Mapping[str, Array], length: int) -> tuple[object, ...]:
    """Decode steps with the same key may run as one batch: their tensors agree in
    dtype and shape but for the rows, and a mask's length (the cache's plus one)."""
    key: list[object] = []
    for name in spec.inputs:
        if not name.startswith(PAST_PREFIX):
            value = received[name]
            last = "mask" if value.shape[-1] == length + 1 else value.shape[-1]
            key.append((name, value.dtype.str, value.shape[1:-1], last))
    return tuple(key)


class Unpaddable(ValueError):
    """Steps whose caches differ in length, with a tensor this stage cannot pad."""


def _mask_pad(name: str, rows: Sequence[Array]) -> object:
    """What a mask-like tensor (its last axis: the cache plus the new token) holds at a
    padded position: the opposite of what each session's own rows hold (one value
    throughout: no session has padding of its own). A keep-mask (1, True) pads with
    0 or False; a Not-mask (False) with True; an additive bias (0.0) with the least
    float."""
    values = {v for row in rows for v in np.unique(row).tolist()}
    if len(values) == 1:
        (real,) = values
        if isinstance(real, bool):
            return not real
        if real == 1:
            return 0
        if real == 0 and np.issubdtype(rows[0].dtype, np.floating):
            return np.finfo(rows[0].dtype).min
    raise Unpaddable(f"cannot pad {name!r}: its values are {sorted(values)[:4]}")


def _batch_feeds(
    session: ort.InferenceSession,
    spec: StageSpec,
    steps: Sequence[tuple[Mapping[str, Array], StageState, bool]],
    lengths: Sequence[int],
) -> dict[str, Array]:
    """The inputs of `run_stage_batch`'s one run (see there)."""
    longest = max(lengths)
    same = len(set(lengths)) == 1
    dynamic = {a.name for a in session.get_inputs() if a.shape and not isinstance(a.shape[-1], int)}
    rows = len(steps)
    feeds: dict[str, Array] = {}
    for name in spec.inputs:
        values = [
            state.past[name] if name.startswith(PAST_PREFIX) else received[name]
            for received, state, _ in steps
        ]
        if same:
            feeds[name] = np.concatenate(values)
        elif name.startswith(PAST_PREFIX):
            first = values[0]
            padded = np.zeros((rows, *first.shape[1:-2], longest, first.shape[-1]), first.dtype)
            for row, (value, n) in enumerate(zip(values, lengths, strict=True)):
                padded[row, ..., longest - n :, :] = value[0]
            feeds[name] = padded
        elif name in dynamic and all(
            v.shape[-1] == n + 1 for v, n in zip(values, lengths, strict=True)
        ):
            shape = (rows, *values[0].shape[1:-1], longest + 1)
            padded = np.full(shape, _mask_pad(name, values), values[0].dtype)
            for row, (value, n) in enumerate(zip(values, lengths, strict=True)):
                padded[row, ..., longest - n :] = value[0]
            feeds[name] = padded
        elif all(v.shape == values[0].shape for v in values):
            feeds[name] = np.concatenate(values)
        else:
            raise Unpaddable(f"cannot batch {name!r} of shapes {[v.shape for v in values]}")
    return feeds


def run_stage_batch(
    session: ort.InferenceSession,
    spec: StageSpec,
    steps: Sequence[tuple[Mapping[str, Array], StageState, bool]],
) -> list[tuple[dict[str, Array], dict[str, Array]]]:
    """Decode steps of several sessions (`decode_rows` >= 0, one `batch_key`) as one run,
    as `_generation._Engine` batches a whole model: each session's cache left-padded to
    the longest, the padding masked off in the mask-like inputs (those whose last,
    dynamic axis is the cache plus the new token: `attention_mask`, or a mask an
    earlier stage derived from it). Per session, what `run_stage` returns; each state
    keeps its own cache. In a worker thread. Raises Unpaddable, having changed
    nothing, when the caches differ in length and a mask-like input cannot be padded."""
    if len(steps) == 1:
        received, state, last_only = steps[0]
        return [run_stage(session, spec, received, state, last_only)]
    lengths = [int(next(iter(state.past.values())).shape[-2]) for _, state, _ in steps]
    longest = max(lengths)
    try:
        feeds = _batch_feeds(session, spec, steps, lengths)
    except Unpaddable:
        raise
    except ValueError as error:  # numpy: tensors that do not stack
        raise JobError(ErrorCode.INVALID_INPUT, f"stage {spec.index + 1}: {error}") from None
    same = len(set(lengths)) == 1
    made = _run(session, spec, feeds)
    trim = {
        a.name
        for a in session.get_outputs()
        if not same
        and a.shape
        and not isinstance(a.shape[-1], int)
        and a.name in made
        and not a.name.startswith(PRESENT_PREFIX)
        and made[a.name].shape[-1] == longest + 1
    }
    out = []
    for row, ((received, state, last_only), n) in enumerate(zip(steps, lengths, strict=True)):
        cut = longest - n
        mine = {}
        for name, value in made.items():
            if name.startswith(PRESENT_PREFIX):
                state.past[PAST_PREFIX + name[len(PRESENT_PREFIX) :]] = value[
                    row : row + 1, ..., cut:, :
                ]
            else:
                mine[name] = (
                    value[row : row + 1, ..., cut:] if name in trim else value[row : row + 1]
                )
        forward = {name: mine.get(name, received.get(name)) for name in spec.boundary_out}
        final = {
            name: np.ascontiguousarray(value)
            for name, value in mine.items()
            if name not in spec.boundary_out
        }
        if last_only and "logits" in final:
            final["logits"] = np.ascontiguousarray(final["logits"][:, -1:, :])
        out.append(({k: v for k, v in forward.items() if v is not None}, final))
    return out


def run_chain_locally(
    stages: Sequence[tuple[ort.InferenceSession, StageSpec]],
    tensors: Mapping[str, Array],
    states: Sequence[StageState] | None = None,
    last_only: bool = False,
) -> dict[str, Array]:
    """Every stage in turn, in this process: the parent's outputs (tests, benchmarks)."""
    received: dict[str, Array] = dict(tensors)
    final: dict[str, Array] = {}
    for i, (session, spec) in enumerate(stages):
        state = states[i] if states is not None else None
        received, made = run_stage(session, spec, received, state, last_only)
        final.update(made)
    return final


# --- serving --------------------------------------------------------------------------------

Answer = dict[str, Array] | StageFailure
_KEYS = itertools.count()


class Downstream:
    """The stream to the next hop's peer: steps go down it, and only a failure
    ever comes back up it (the answers go from the last stage to the coordinator)."""

    def __init__(self, node: Node, hops: tuple[Hop, ...], reply: tuple[str, str]) -> None:
        self.node = node
        self.hops = hops
        self.reply = reply
        self.channel: Channel | None = None
        self.opened = trio.Event()
        self.closed = False
        self.key = next(_KEYS)  # this session's key at the next peer (on /1.1.0)
        self.batch = False  # the next peer speaks /1.1.0: rows may go to it in one frame
        self.carried = False  # rows of other sessions have gone on this stream

    @property
    def peer(self) -> str:
        return self.hops[0].peer_id

    async def send(self, step: StageStep) -> StageFailure | None:
        """Send `step` on; a failure naming the next peer if it cannot be."""
        first = self.channel is None
        try:  # checked before the stream opens (the key, after: as the peer speaks)
            encode_step(step, self.node.config.max_request_bytes) if first else None
        except JobError as error:
            return StageFailure(error.code, error.message)
        try:
            if first:
                await _dial(self.node, self.peer)
                stream = await self._open()
                self.channel = Channel(stream, self.node.config.max_reply_bytes)
                self.opened.set()
        except (JobError, trio.TooSlowError, *TRANSPORT_ERRORS) as error:
            return self._unreachable(error)
        try:
            payload = encode_step(
                StageStep(
                    step.tensors,
                    self.hops if first else (),
                    step.last_only,
                    self.reply if first else None,
                    self.key if first and self.batch else None,
                ),
                self.node.config.max_request_bytes,
            )
        except JobError as error:
            return StageFailure(error.code, error.message)
        return await self.send_payload(payload)

    async def _open(self) -> INetStream:
        """A stream on /1.1.0, or /1.0.0 to a peer that does not speak it."""
        old = self.node.chains.stage_unbatched
        if self.peer not in old:
            try:
                stream = await self.node.open_stream(self.peer, STAGE_BATCH_PROTOCOL, HOP_DIAL_S)
                self.batch = True
                return stream
            except JobError:
                pass  # a peer that is gone fails /1.0.0 too
        stream = await self.node.open_stream(self.peer, STAGE_PROTOCOL, HOP_DIAL_S)
        old.add(self.peer)
        return stream

    def _unreachable(self, error: Exception) -> StageFailure:
        """The failure that names this session's next peer as unreachable."""
        if isinstance(error, JobError):
            why = f"stage peer {self.peer}: {error}"
        else:
            why = f"stage peer {self.peer} failed: {error!r}"
        return StageFailure(ErrorCode.PEER_UNREACHABLE, why, self.peer)

    async def send_payload(self, payload: bytes) -> StageFailure | None:
        """Send a frame (a step, or rows of sessions whose streams go to this peer too),
        on this session's stream; a failure naming the next peer if it cannot be."""
        try:
            assert self.channel is not None
            await self.channel.send(payload)
        except (JobError, trio.TooSlowError, *TRANSPORT_ERRORS) as error:
            return self._unreachable(error)
        return None

    async def watch(self) -> StageFailure:
        """The failure the chain after this hop reports, or that breaks its stream."""
        await self.opened.wait()
        assert self.channel is not None
        try:
            while True:
                answer = decode_answer(await self.channel.receive())
                if isinstance(answer, StageFailure):
                    return answer
        except (ValueError, FrameError, EOFError, *TRANSPORT_ERRORS) as error:
            return StageFailure(
                ErrorCode.PEER_UNREACHABLE, f"stage peer {self.peer} failed: {error!r}", self.peer
            )

    async def close(self) -> None:
        self.closed = True
        if self.channel is not None and self.carried:
            # Its stream may have carried other sessions' rows just now: a reset could
            # drop them unread at the next peer; what was written is read, then EOF.
            await self.channel.close()
        elif self.channel is not None:
            await self.channel.discard()


class ReplyStream:
    """The last stage's stream to the coordinator, for its answers."""

    def __init__(self, node: Node, coordinator: str, session_id: str) -> None:
        self.node = node
        self.coordinator = coordinator
        self.session_id = session_id
        self.channel: Channel | None = None
        self.batch = False  # the coordinator speaks /1.1.0: rows of answers may go to it

    async def send(self, answer: Answer) -> None:
        """Raises a transport error (or JobError) when the coordinator is gone."""
        if self.coordinator == self.node.peer_id:
            self.node.chains.deliver(self.session_id, self.node.peer_id, answer)
            return
        if self.channel is None:
            await _dial(self.node, self.coordinator)
            stream = await self._open()
            self.channel = Channel(stream, self.node.config.max_request_bytes)
            await self.channel.send(msgpack.packb({"s": self.session_id}))
        await self.channel.send(encode_answer(answer, self.node.config.max_reply_bytes))

    async def _open(self) -> INetStream:
        """A stream on /1.1.0, or /1.0.0 to a coordinator that does not speak it."""
        old = self.node.chains.answer_unbatched
        if self.coordinator not in old:
            try:
                stream = await self.node.open_stream(
                    self.coordinator, ANSWER_BATCH_PROTOCOL, HOP_DIAL_S
                )
                self.batch = True
                return stream
            except JobError:
                pass
        stream = await self.node.open_stream(self.coordinator, ANSWER_PROTOCOL, HOP_DIAL_S)
        old.add(self.coordinator)
        return stream

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class StageSession:
    """This node's part of one chain session: its leading hops (consecutive stages
    run without a hop), each with its cache, and what comes after them."""

    def __init__(self, node: Node, hops: tuple[Hop, ...], reply: tuple[str, str]) -> None:
        self.node = node
        self.mine, rest = _my_hops(node, hops)
        batching = node.config.executor.batch_decode
        self.batchers = [batcher(node, card) for card, _ in self.mine] if batching else []
        for b in self.batchers:
            b.sessions += 1
        self.down = Downstream(node, rest, reply) if rest else None
        self.reply = None if rest else ReplyStream(node, *reply)
        self.stepped = trio.current_time()  # when a step last came
        self.broken = trio.Event()  # set when a step that came in rows failed or ended it
        self.failure: StageFailure | None = None  # ... and what to report up its stream

    def fail(self, failure: StageFailure | None) -> None:
        """End this session's stream (reporting `failure` up it, if any)."""
        if not self.broken.is_set():
            self.failure = failure
            self.broken.set()

    async def step(self, step: StageStep, expect: int = 1) -> StageFailure | None:
        """Run this node's stages on `step`; send the activations on, or the answer
        to the coordinator. A failure to report upstream, or None. `expect`: this many
        sessions' steps came at once (in rows) and may run as one batch."""
        self.stepped = trio.current_time()
        received = step.tensors
        final: dict[str, Array] = {}
        for i, (card, state) in enumerate(self.mine):
            last = i == len(self.mine) - 1
            run = await _run_one(
                self.node, card, state, received, step.last_only, self if last else None, expect
            )
            received, made = run.result
            if run.sent is not None:  # in one frame of rows with the rest of its batch
                return run.sent[0]
            final.update(made)
        if self.down is not None:
            return await self.down.send(StageStep(received, (), step.last_only))
        assert self.reply is not None
        await self.reply.send(final)
        return None

    async def close(self) -> None:
        for b in self.batchers:
            b.sessions -= 1
        self.batchers = []
        if self.down is not None:
            await self.down.close()
        if self.reply is not None:
            await self.reply.close()


@dataclass(slots=True)
class _Ran:
    result: tuple[dict[str, Array], dict[str, Array]]  # what goes on, the parent's outputs
    sent: tuple[StageFailure | None] | None = None  # sent on in rows: (the failure,)


async def _run_one(
    node: Node,
    card: ModelCard,
    state: StageState,
    received: dict[str, Array],
    last_only: bool,
    session: StageSession | None = None,
    expect: int = 1,
) -> _Ran:
    """One stage on one session's step; a decode step joins the stage's batch, whose
    leader may send it on (with `session`: its last stage here) in one frame of rows."""
    assert card.stage is not None
    if node.config.executor.batch_decode and decode_rows(card.stage, received, state) >= 0:
        return await batcher(node, card).step(received, state, last_only, session, expect)
    return _Ran((await _compute(node, card, [(received, state, last_only)]))[0])


def batcher(node: Node, card: ModelCard) -> StageBatcher:
    """The node's batcher of `card`'s decode steps."""
    found = node.chains.batchers.get(card.id)
    if found is None:
        found = node.chains.batchers[card.id] = StageBatcher(node, card)
    return found


async def _compute(
    node: Node, card: ModelCard, steps: list[tuple[Mapping[str, Array], StageState, bool]]
) -> list[tuple[dict[str, Array], dict[str, Array]]]:
    """One run of `card`'s stage on `steps` (one, or decode steps that share a batch)."""
    assert card.stage is not None
    async with node.executor.models.use(card.id) as loaded:
        # A stage that has run fast runs in the event loop's thread: for a decode
        # step the hop to a worker thread and back costs more than it.
        compute_ms = node.chains.compute_ms  # stage model id -> EWMA of a run's wall time
        inline = compute_ms.get(card.id, math.inf) < node.config.executor.inline_below_ms
        started = time.perf_counter()
        if len(steps) == 1:
            received, state, last_only = steps[0]
            args = (loaded.session, card.stage, received, state, last_only)
            if inline:
                return [run_stage(*args)]
            result = [
                await trio.to_thread.run_sync(run_stage, *args, limiter=node.executor.limiter)
            ]
        elif inline:
            result = run_stage_batch(loaded.session, card.stage, steps)
        else:
            result = await trio.to_thread.run_sync(
                run_stage_batch, loaded.session, card.stage, steps, limiter=node.executor.limiter
            )
        ms = (time.perf_counter() - started) * 1e3
        node.executor.note_run(card.id, ok=True, latency_ms=ms)  # announced: placement uses it
        old = compute_ms.get(card.id)
        compute_ms[card.id] = ms if old is None else old + 0.2 * (ms - old)
    return result


@dataclass(slots=True, eq=False)
class _Waiting:
    """A session's decode step waiting for its batch (or its turn to run one)."""

    received: Mapping[str, Array]
    state: StageState
    last_only: bool
    session: StageSession | None = None  # sent on by the leader if it can be (`_forward`)
    woken: trio.Event = field(default_factory=trio.Event)
    result: tuple[dict[str, Array], dict[str, Array]] | None = None
    error: JobError | None = None
    sent: tuple[StageFailure | None] | None = None


class StageBatcher:
    """Continuous batching at a stage peer: the decode steps of all sessions of one stage
    model that are waiting when a run starts go in that run, one row each. The step
    that finds no run going leads: after one checkpoint (the steps that arrived with
    it join), it runs every waiting step; the steps that come while it runs wait, and
    the first of them leads the next run. Prefills run alone (see `_run_one`)."""

    def __init__(self, node: Node, card: ModelCard) -> None:
        self.node = node
        self.card = card
        self.waiting: list[_Waiting] = []
        self.leader: _Waiting | None = None
        self.sessions = 0  # open sessions through this stage here
        self.runs = 0  # onnxruntime runs of decode steps
        self.rows = 0  # decode steps they ran
        self.largest = 0  # the most rows in one run
        self.sent = 0  # steps sent on in frames of rows
        self.answered = 0  # steps whose answers went in frames of rows

    async def step(
        self,
        received: Mapping[str, Array],
        state: StageState,
        last_only: bool,
        session: StageSession | None = None,
        expect: int = 1,
    ) -> _Ran:
        me = _Waiting(received, state, last_only, session)
        self.waiting.append(me)
        try:
            if self.leader is None:
                self.leader = me
            else:
                await me.woken.wait()
            if self.leader is me:
                await self._gather(expect)
                batch, self.waiting = self.waiting, []
                await self._run(batch)
            if me.error is not None:
                raise me.error
            assert me.result is not None
            return _Ran(me.result, me.sent)
        finally:
            if me in self.waiting:  # cancelled before its run
                self.waiting.remove(me)
            if self.leader is me:
                self.leader = self.waiting[0] if self.waiting else None
                if self.leader is not None:
                    self.leader.woken.set()

    async def _gather(self, expect: int) -> None:
        """Let the steps that arrived with the leader's join its run: those that came
        in the same frame of rows (`expect` in all: they join at the next checkpoint),
        or, with other sessions open here, until every other task waits (their frames
        read), for at most a run's time (waiting longer costs more than a second run)
        and `GATHER_S`; else one checkpoint."""
        if expect > 1:
            with trio.move_on_after(GATHER_S):
                while len(self.waiting) < expect:
                    await trio.lowlevel.checkpoint()
            return
        if self.sessions <= len(self.waiting):
            await trio.lowlevel.checkpoint()
            return
        run_s = self.node.chains.compute_ms.get(self.card.id, 0.0) / 1e3
        from trio.testing import wait_all_tasks_blocked  # (its import takes pytest's)

        with trio.move_on_after(min(GATHER_S, GATHER_RUNS * run_s)):
            await wait_all_tasks_blocked()

    async def _run_group(self, group: list[_Waiting]) -> None:
        """One run for `group`; runs per cache length if its masks cannot be padded."""
        try:
            steps = [(w.received, w.state, w.last_only) for w in group]
            results = await _compute(self.node, self.card, steps)
        except Unpaddable:
            by_length: dict[int, list[_Waiting]] = {}
            for w in group:
                length = int(next(iter(w.state.past.values())).shape[-2])
                by_length.setdefault(length, []).append(w)
            for same in by_length.values():
                await self._run_group(same)
            return
        except JobError as error:
            if len(group) > 1:  # one session's bad step fails that session alone
                for w in group:
                    await self._run_group([w])
                return
            group[0].error = error
            return
        self.runs += 1
        self.rows += len(group)
        self.largest = max(self.largest, len(group))
        for w, result in zip(group, results, strict=True):
            w.result = result

    async def _run(self, batch: list[_Waiting]) -> None:
        assert self.card.stage is not None
        groups: dict[tuple[object, ...], list[_Waiting]] = {}
        for w in batch:
            length = int(next(iter(w.state.past.values())).shape[-2])
            groups.setdefault(batch_key(self.card.stage, w.received, length), []).append(w)
        try:
            for group in groups.values():
                await self._run_group(group)
            await self._forward(batch)
        finally:
            for w in batch:
                if w.result is None and w.error is None:
                    w.error = JobError(ErrorCode.INTERNAL, "the stage's batch did not run")
                w.woken.set()

    async def _forward(self, batch: list[_Waiting]) -> None:
        """Send the steps that ran, of sessions whose streams go on to one peer that
        speaks /1.1.0, to that peer in one frame of rows (two or more of them)."""
        by_peer: dict[tuple[str, bool], list[tuple[_Waiting, Downstream]]] = {}
        for w in batch:
            down = w.session.down if w.session is not None else None
            if w.result is not None and down is not None and down.batch and not down.closed:
                by_peer.setdefault((down.peer, w.last_only), []).append((w, down))
        await self._answer(batch)
        for (_, last_only), group in by_peer.items():
            if len(group) < 2:
                continue
            rows = StageRows([(down.key, w.result[0]) for w, down in group], last_only)  # type: ignore[index]
            try:
                payload = encode_rows(rows, self.node.config.max_request_bytes)
            except JobError:
                continue  # too large together: each goes on its own
            group[0][1].carried = True
            failure = await group[0][1].send_payload(payload)
            self.sent += len(group)
            for w, _ in group:
                w.sent = (failure,)

    async def _answer(self, batch: list[_Waiting]) -> None:
        """Send the answers of the steps that ran, of sessions that end here (this
        stage alone of theirs here) and answer one coordinator that speaks /1.1.0,
        to it in one frame of rows (two or more of them)."""
        by_peer: dict[str, list[tuple[_Waiting, ReplyStream]]] = {}
        for w in batch:
            session = w.session
            reply = session.reply if session is not None else None
            if (
                w.result is not None
                and reply is not None
                and reply.batch
                and reply.channel is not None
                and len(session.mine) == 1  # type: ignore[union-attr]
            ):
                by_peer.setdefault(reply.coordinator, []).append((w, reply))
        for group in by_peer.values():
            if len(group) < 2:
                continue
            rows = [(reply.session_id, w.result[1]) for w, reply in group]  # type: ignore[index]
            try:
                payload = encode_answer_rows(rows, self.node.config.max_reply_bytes)
            except JobError:
                continue  # too large together: each goes on its own
            channel = group[0][1].channel
            assert channel is not None
            try:
                await channel.send(payload)
            except (FrameError, EOFError, *TRANSPORT_ERRORS) as error:
                for w, _ in group:  # the coordinator is gone: the sessions end
                    w.error = JobError(ErrorCode.PEER_UNREACHABLE, f"coordinator: {error!r}")
                continue
            self.answered += len(group)
            for w, _ in group:
                w.sent = (None,)


async def _run_rows(
    node: Node, peer: str, frame: StageRows, own: StageSession
) -> StageFailure | None:
    """Run the rows from `peer` (each its session's step, as one batch where they can
    be); end the sessions whose steps failed. The failure of `own` (the session of the
    stream they came on), or None. Raises ValueError naming a key `peer` has not
    opened, having run nothing."""
    found = []
    for key, tensors in frame.rows:
        session = node.chains.stage_keys.get((peer, key))
        if session is None:
            raise ValueError(f"no session of key {key} from this peer")
        found.append((session, tensors))
    failures: list[tuple[StageSession, StageFailure | None]] = []

    async def one(session: StageSession, tensors: dict[str, Array]) -> None:
        try:
            failure = await session.step(StageStep(tensors, (), frame.last_only), len(found))
        except JobError as error:
            failure = StageFailure(error.code, error.message)
        except (FrameError, EOFError, *TRANSPORT_ERRORS) as error:  # its coordinator is gone
            logger.debug("stage session from %s ended: %r", peer, error)
            failures.append((session, None))
            return
        if failure is not None:
            failures.append((session, failure))

    async with trio.open_nursery() as nursery:
        for session, tensors in found:
            nursery.start_soon(one, session, tensors)
    mine: StageFailure | None = None
    for session, failure in failures:
        if session is own and failure is not None:
            mine = failure
        else:
            session.fail(failure)
    return mine


async def _dial(node: Node, peer: str) -> None:
    """Connect to `peer` by the addresses of its record, unless connected already:
    the next stage's peer need not be one of this node's neighbours."""
    if peer in node.connected_peers():
        return
    known = node.view.snapshot().peers.get(peer)
    for addr in known.record.addrs if known is not None else ():
        try:
            await node.connect(f"{addr}/p2p/{peer}")
            return
        except (JobError, ConfigError):
            continue


async def serve_stage(node: Node, stream: INetStream, batch: bool = False) -> None:
    """Run the steps of one chain session from `stream` until the caller hangs up;
    report a failure (here or after this hop) back up the stream, and end. `batch`
    (/1.1.0): the session may have a key, and frames of rows come on the stream."""
    peer = str(stream.muxed_conn.peer_id)
    keys = node.chains.stage_keys
    keyed: tuple[str, int] | None = None
    channel = Channel(stream, node.config.max_request_bytes)
    lock = trio.Lock()
    sessions: list[StageSession] = []
    reported = False

    async def report(failure: StageFailure) -> None:
        nonlocal reported
        async with lock:
            await channel.send(encode_answer(failure, node.config.max_reply_bytes))
            reported = True

    async def watch(down: Downstream, scope: trio.CancelScope) -> None:
        failure = await down.watch()
        if not down.closed:
            await report(failure)
        scope.cancel()

    async def broken(session: StageSession, scope: trio.CancelScope) -> None:
        await session.broken.wait()
        if session.failure is not None:
            await report(session.failure)
        scope.cancel()

    async def idle(session: StageSession) -> None:
        """A keyed session's steps may come on other streams: it ends after
        `STEP_WAIT_S` without any."""
        while True:
            await trio.sleep_until(session.stepped + STEP_WAIT_S)
            if trio.current_time() >= session.stepped + STEP_WAIT_S:
                raise trio.TooSlowError

    async def steps(nursery: trio.Nursery) -> None:
        nonlocal keyed
        while True:
            if keyed is None:
                with trio.fail_after(STEP_WAIT_S):
                    payload = await channel.receive()
            else:
                payload = await channel.receive()
            failure: StageFailure | None
            try:
                frame = decode_frame(payload, batch)
                if isinstance(frame, StageRows):
                    if not sessions:
                        raise ValueError("a session's first step comes before rows")
                    failure = await _run_rows(node, peer, frame, sessions[0])
                    if failure is not None:
                        await report(failure)
                        return
                    continue
                step = frame
                if not sessions:
                    if step.reply is None:
                        raise ValueError("a session's first step names its coordinator")
                    if step.key is not None and (peer, step.key) in keys:
                        raise ValueError(f"key {step.key} is another session's")
                    session = StageSession(node, step.hops, step.reply)
                    sessions.append(session)
                    nursery.start_soon(broken, session, nursery.cancel_scope)
                    if step.key is not None:
                        keyed = (peer, step.key)
                        keys[keyed] = session
                        nursery.start_soon(idle, session)
                    if session.down is not None:
                        nursery.start_soon(watch, session.down, nursery.cancel_scope)
                elif step.hops or step.reply or step.key is not None:
                    raise ValueError("hops, reply and key go on a session's first step only")
                failure = await sessions[0].step(step)
            except ValueError as error:
                failure = StageFailure(ErrorCode.MALFORMED_MESSAGE, f"bad stage step: {error}")
            except JobError as error:
                failure = StageFailure(error.code, error.message)
            if failure is not None:
                await report(failure)
                return

    try:
        async with trio.open_nursery() as nursery:
            await steps(nursery)
            nursery.cancel_scope.cancel()
    except* (trio.TooSlowError, FrameError, EOFError, *TRANSPORT_ERRORS) as group:
        # Also when they come with the node's own shutdown (Cancelled goes on).
        logger.debug("stage stream from %s ended: %r", peer, group.exceptions)
    finally:
        if keyed is not None:
            del keys[keyed]
        with trio.CancelScope(shield=True):
            for session in sessions:
                await session.close()
            if reported:  # a reset would overtake the report: close; the caller resets
                await channel.close()
            else:
                await channel.discard()


async def serve_answers(node: Node, stream: INetStream, batch: bool = False) -> None:
    """The last stage's answers for one of this node's chain sessions (`batch`: on
    /1.1.0, and rows of answers of any of them)."""
    peer = str(stream.muxed_conn.peer_id)
    channel = Channel(stream, node.config.max_reply_bytes)
    try:
        with trio.fail_after(HOP_DIAL_S):
            opening = _unpack(await channel.receive())
        session_id = opening.get("s")
        if set(opening) != {"s"} or not isinstance(session_id, str):
            raise ValueError("an answer stream opens with its session id")
        while True:
            payload = await channel.receive()
            raw = _unpack(payload)
            if batch and "rows" in raw:
                # Each to its session if it is open and `peer` is its last stage's.
                for sid, tensors in decode_answer_rows(raw):
                    node.chains.deliver(sid, peer, tensors)
                continue
            answer = decode_answer(payload, raw)
            if not node.chains.deliver(session_id, peer, answer):
                break
    except (ValueError, trio.TooSlowError, FrameError, EOFError, *TRANSPORT_ERRORS) as error:
        logger.debug("stage answers from %s ended: %r", peer, error)
    finally:
        await channel.discard()


Mine = list[tuple[ModelCard, StageState]]


def _my_hops(node: Node, hops: tuple[Hop, ...]) -> tuple[Mine, tuple[Hop, ...]]:
    """The leading hops that are this node's (consecutive stages run without a hop)."""
    if not hops or hops[0].peer_id != node.peer_id:
        raise ValueError("a session's first step names this node as its first hop")
    mine = []
    i = 0
    while i < len(hops) and hops[i].peer_id == node.peer_id:
        card = node.executor.models.card(hops[i].model_id)
        if card is None or card.stage is None:
            raise JobError(
                ErrorCode.UNKNOWN_MODEL, f"this node serves no stage {hops[i].model_id!r}"
            )
        mine.append((card, StageState()))
        i += 1
    return mine, hops[i:]
