"""The wire messages of every p2p-node protocol: frozen values, each field's bounds
declared beside it (see `_schema`), checked when a message is built.

Pure: no trio, no libp2p, no msgpack (the codec is `_codec`). A new message is
one dataclass here, subclassing `Request` or `Response`, and one registration in
`_codec`. Building one with a value its protocol cannot carry raises
`InvalidMessage` (INVALID_INPUT) here, not a peer's MALFORMED_MESSAGE later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, TypeAlias

from gossip import MAX_BOOT_ID_LENGTH, DigestEntry, ModelDescriptor, PeerRecord
from scheduler import (
    NO_REQUIREMENTS,
    Candidate,
    DistributionStrategy,
    ErrorCode,
    Excluded,
    InferenceResult,
    JobError,
    Placement,
    Requirements,
    Tensors,
)
from selection import Learned as Learned
from selection import LeftOut, RankedModel, Selection

from ._schema import MAX_ID_LENGTH as MAX_ID_LENGTH
from ._schema import MAX_TENSORS as MAX_TENSORS
from ._schema import (
    SPARSE,
    SPREAD,
    ContextMap,
    Int,
    Items,
    Key,
    Number,
    OrElse,
    Row,
    TensorMap,
    Text,
    check,
    declare,
    invalid,
)
from ._schema import InvalidMessage as InvalidMessage
from ._schema import WireError as WireError

VERSION = 1
MAX_MESSAGE_LENGTH = 4096
MAX_TIMEOUT_MS = 3_600_000
MAX_LIST_LENGTH = 64
MAX_LOAD = 2**31 - 1
MAX_PEERS = 100_000
MAX_MODELS = 1024
MAX_RANKED = 4 * MAX_LIST_LENGTH
MAX_REASONS = 16
MAX_LEARNED = 4096
MAX_INT = 2**63 - 1
MAX_TEXT_CHARS = 1 << 24
MAX_TEXTS = 1024  # texts in one job; a node may cap them lower (max_batch_rows)
MAX_TEXT_LENGTH = 1_000_000  # characters of one text; a model's token limit comes first

ContextValue = str | int | float
Id: TypeAlias = Annotated[str, Text()]
Count: TypeAlias = Annotated[int, Int(0, MAX_LOAD)]
REASON = Text(MAX_MESSAGE_LENGTH, label="reason")
NON_NEGATIVE = Number(lo=0.0)
DIGEST_ENTRY = Row(
    (
        Text(label="peer id"),
        Text(MAX_BOOT_ID_LENGTH, label="boot id"),
        Int(0, MAX_INT, label="seq"),
        Number(lo=0.0, label="issued at"),
    )
)


class Request:
    """A request of any protocol: one of the dataclasses below. Each checks its
    fields when built; one with rules across fields adds them to its own
    `__post_init__` (after `check(self)`)."""

    __slots__ = ()

    def __post_init__(self) -> None:
        check(self)


class Response:
    """A reply of any protocol but `run`'s, whose InferenceResult the scheduler owns."""

    __slots__ = ()

    def __post_init__(self) -> None:
        check(self)


Reply: TypeAlias = Response | InferenceResult


# --- requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRequest(Request):
    """Run `model_id` on `inputs`. Sent on both the job and the infer protocol.

    A job may name a `task` type instead (with `model_id` empty): the coordinator
    selects the model with `selection` (a strategy name; None: its default) in
    `context`, then places it. The infer protocol always names a model.

    A text job carries `texts` and no `inputs`: the node that runs it tokenizes
    them with its model's tokenizer. `truncate` (only when set) lets that node cut
    a text longer than the model's window where the model would refuse it.
    """

    job_id: Id
    model_id: Annotated[str, Text(empty=True)]  # empty only with a task
    inputs: Annotated[Tensors, TensorMap()]
    timeout_ms: Annotated[int, Int(1, MAX_TIMEOUT_MS)]
    strategy: DistributionStrategy | None = None  # None: the coordinator's default
    requirements: Annotated[Requirements, Key("requires")] = NO_REQUIREMENTS
    task: Annotated[str | None, Text()] = None
    selection: Annotated[str | None, Text()] = None
    context: Annotated[Mapping[str, ContextValue], ContextMap()] = field(default_factory=dict)
    hedge: bool = False  # also ask a second peer if the first is slower than its p95
    # the outputs wanted (a model's only); () for all, and then not on the wire
    outputs: Annotated[
        tuple[str, ...], Items(MAX_TENSORS, Text(label="output name"), min_len=1), SPARSE
    ] = ()
    # a text job's strings (then no inputs); () for a tensor job, and then not on the wire
    texts: Annotated[
        tuple[str, ...],
        Items(MAX_TEXTS, Text(MAX_TEXT_LENGTH, label="text"), min_len=1, label="texts"),
        SPARSE,
    ] = ()
    truncate: Annotated[bool | None, SPARSE] = None  # None: as the model's [text] table says

    def __post_init__(self) -> None:
        check(self)
        if self.texts and self.inputs:
            raise invalid("a run request carries texts or input tensors, not both")
        if self.truncate is not None and not self.texts:
            raise invalid("truncate goes with texts")
        if self.texts and self.outputs:
            raise invalid("outputs go with tensor jobs; a text job answers its text outputs")
        if self.task is None and not self.model_id:
            raise invalid(f"model_id must be 1 to {MAX_ID_LENGTH} characters")
        if self.task is not None and self.model_id:
            raise invalid("a run request names a model_id or a task, not both")
        if self.task is not None and self.outputs:
            raise invalid("outputs go with a model_id; a task job answers its model's outputs")
        if self.outputs and len(set(self.outputs)) != len(self.outputs):
            raise invalid(f"outputs names one output twice: {list(self.outputs)}")


@dataclass(frozen=True, slots=True)
class ModelsRequest(Request):
    pass


@dataclass(frozen=True, slots=True)
class PeersRequest(Request):
    pass


@dataclass(frozen=True, slots=True)
class LoadRequest(Request):
    """How busy are you now? A coordinator's probe just before it places a request."""


@dataclass(frozen=True, slots=True)
class StatsRequest(Request):
    """What have you coordinated lately, and how busy are you? What `p2p-node top` asks."""


@dataclass(frozen=True, slots=True)
class SyncRequest(Request):
    """The records I hold, as their signed GossipSub messages; send me yours.
    Exchanged once when two peers connect, so neither waits for a refresh."""

    messages: Annotated[tuple[bytes, ...], Items(MAX_PEERS)]


@dataclass(frozen=True, slots=True)
class DigestRequest(Request):
    """Which records I hold, one (peer id, boot id, seq, issued at) each, and the
    records you asked me for (signed GossipSub messages): send me the records I
    lack or hold older, and name those you lack. Anti-entropy, on the sync protocol."""

    digest: Annotated[tuple[DigestEntry, ...], Items(MAX_PEERS, DIGEST_ENTRY)]
    messages: Annotated[tuple[bytes, ...], Items(MAX_PEERS)] = ()


@dataclass(frozen=True, slots=True)
class PlaceRequest(Request):
    """Where would `model_id` run now? Answered with a ranking; nothing runs."""

    model_id: Id
    strategy: DistributionStrategy
    requirements: Annotated[Requirements, Key("requires")] = NO_REQUIREMENTS


@dataclass(frozen=True, slots=True)
class SelectRequest(Request):
    """How would the node select models for `task` in `context`? Nothing runs."""

    task: Id
    strategy: Id
    context: Annotated[Mapping[str, ContextValue], ContextMap()] = field(default_factory=dict)
    k: Annotated[int | None, Int(1, MAX_LIST_LENGTH)] = None


@dataclass(frozen=True, slots=True)
class FeedbackRequest(Request):
    """A quality score in [0, 1] for a job the receiving node coordinated."""

    job_id: Id
    score: Annotated[float, Number(0.0, 1.0)]


# --- replies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorReply(Response):
    code: Annotated[ErrorCode, OrElse(ErrorCode.INTERNAL)]  # a newer peer's code: INTERNAL
    message: Annotated[str, Text(MAX_MESSAGE_LENGTH, empty=True, cut=True)]
    peer: Annotated[str, Text(empty=True)]
    retry_after: Annotated[float | None, NON_NEGATIVE, SPARSE] = None  # seconds

    @classmethod
    def from_error(cls, error: JobError, peer: str) -> ErrorReply:
        """The reply that reports `error`. Always one that can be built: a handler's
        error must reach its caller, so a retry hint out of bounds is left out."""
        wait = error.retry_after
        if wait is not None and not (type(wait) in (int, float) and 0 <= wait < math.inf):
            wait = None
        return cls(error.code, error.message, error.peer or peer, wait)

    def to_error(self) -> JobError:
        return JobError(
            self.code, self.message, peer=self.peer or None, retry_after=self.retry_after
        )


@dataclass(frozen=True, slots=True)
class ModelsReply(Response):
    peer_id: Id
    models: Annotated[tuple[ModelDescriptor, ...], Items(MAX_MODELS)]


@dataclass(frozen=True, slots=True)
class PeerReport:
    """One entry of a node's view, as `p2p-node peers` shows it."""

    record: PeerRecord
    age_s: Annotated[float, NON_NEGATIVE]  # since the record arrived
    state: Id  # "alive" or "suspect"

    def __post_init__(self) -> None:
        check(self)
        if self.state not in ("alive", "suspect"):
            raise invalid(f"peer report: state must be alive or suspect, got {self.state!r}")


@dataclass(frozen=True, slots=True)
class PeersReply(Response):
    peer_id: Id
    peers: Annotated[tuple[PeerReport, ...], Items(MAX_PEERS)]


@dataclass(frozen=True, slots=True)
class LoadReply(Response):
    peer_id: Id
    in_flight: Count  # requests running
    queue_length: Count  # requests admitted and waiting for a worker

    @property
    def load(self) -> int:
        return self.in_flight + self.queue_length


@dataclass(frozen=True, slots=True)
class ModelStats:
    """The jobs one node coordinated for one model since it started (`errors` of them
    failed), and the p50 and p99 of its latest answered ones (None before any)."""

    model_id: Id
    jobs: Annotated[int, Int(0, MAX_INT)]
    errors: Annotated[int, Int(0, MAX_INT)]
    p50_ms: Annotated[float | None, NON_NEGATIVE] = None
    p99_ms: Annotated[float | None, NON_NEGATIVE] = None

    def __post_init__(self) -> None:
        check(self)
        if self.errors > self.jobs:
            raise invalid(f"model stats: {self.errors} errors of {self.jobs} jobs")


@dataclass(frozen=True, slots=True)
class StatsReply(Response):
    peer_id: Id
    in_flight: Count  # requests running
    queue_length: Count  # requests admitted and waiting for a worker
    models: Annotated[tuple[ModelStats, ...], Items(MAX_MODELS)]


@dataclass(frozen=True, slots=True)
class SyncReply(Response):
    messages: Annotated[tuple[bytes, ...], Items(MAX_PEERS)]


@dataclass(frozen=True, slots=True)
class DigestReply(Response):
    """The records the digest's sender lacks, and the peers whose records it should send:
    the sender itself among them if its current record is held here as of a peer
    gone (it should publish a newer one)."""

    messages: Annotated[tuple[bytes, ...], Items(MAX_PEERS)]
    wants: Annotated[tuple[str, ...], Items(MAX_PEERS, Text(label="peer id"))]


@dataclass(frozen=True, slots=True)
class PlaceReply(Response):
    peer_id: Id
    placement: Annotated[Placement, SPREAD]  # model_id, candidates, excluded


@dataclass(frozen=True, slots=True)
class SelectReply(Response):
    peer_id: Id
    selection: Annotated[Selection, SPREAD]  # task, strategy, bucket, ranked, excluded
    learned: Annotated[tuple[Learned, ...], Items(MAX_LEARNED)]


@dataclass(frozen=True, slots=True)
class FeedbackReply(Response):
    peer_id: Id
    job_id: Id
    # the models the score was credited to
    model_ids: Annotated[
        tuple[str, ...], Items(MAX_LIST_LENGTH, Text(label="model_id")), Key("models")
    ]


# --- the bounds of values that other layers own -------------------------------------------

declare(
    InferenceResult,
    job_id=Text(),
    model_id=Text(),
    outputs=TensorMap(),
    executor=Text(),
    queue_ms=NON_NEGATIVE,
    compute_ms=NON_NEGATIVE,
    route=Items(
        MAX_LIST_LENGTH, Row((Text(label="model_id"), Int(0, MAX_INT, label="route rows")))
    ),
    load=(Int(0, MAX_LOAD), SPARSE),  # None: the executor did not say
    labels=(Items(MAX_TEXTS, Text(label="label")), SPARSE),  # a text classifier's answer
    texts=(Items(MAX_TEXTS, Text(MAX_TEXT_CHARS, empty=True, label="text")), SPARSE),
)
declare(
    Requirements,
    min_memory_mb=Int(0, MAX_INT),
    provider=Text(),
)
declare(
    Placement,
    model_id=Text(),
    candidates=Items(MAX_PEERS),
    excluded=Items(MAX_PEERS),
)
declare(Candidate, row=True, peer_id=Text(), score=Number(), reason=REASON)
# An exclusion's cause is for the coordinator that made it; peers read the reason.
declare(Excluded, row=True, local=("cause",), peer_id=Text(), reason=REASON)
declare(
    Selection,
    order=("task_type", "strategy", "bucket", "ranked", "excluded"),
    task_type=(Text(), Key("task")),
    bucket=Text(),
    ranked=Items(MAX_RANKED),
    excluded=Items(MAX_RANKED),
)
declare(RankedModel, row=True, model_id=Text(), score=Number(), reasons=Items(MAX_REASONS, REASON))
declare(LeftOut, row=True, model_id=Text(), reason=REASON)
declare(
    Learned,
    row=True,
    model_id=Text(),
    bucket=Text(),
    runs=Int(0, MAX_INT),
    failures=Int(0, MAX_INT),
    latency_ms=NON_NEGATIVE,
    success_rate=NON_NEGATIVE,
    quality=NON_NEGATIVE,
    quality_weight=NON_NEGATIVE,
)


# --- generation (the generate protocol: one request, a stream of frames back) -----------

MAX_PROMPT_CHARS = 1 << 20
MAX_NEW_TOKENS = 1 << 20
MAX_SEED = 2**64 - 1
MAX_PIECE_CHARS = 1 << 16
MAX_PIECE_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class GenerateRequest(Request):
    """Generate text from `prompt` with `model_id`, or a model of `task` selected with
    `selection` in `context`; the tokens stream back as `GeneratedPiece`s, then one
    `GenerateSummary` (or an `ErrorReply`).

    `temperature` 0 is greedy; above it, sampling from the top `top_k` tokens (0:
    all) whose probabilities add up to `top_p`, drawn with `seed` (None: the
    executing node picks one). `forward` False asks the receiving node to run it
    itself (a coordinator placed it there); True lets it place it on any peer.
    """

    job_id: Id
    model_id: Annotated[str, Text(empty=True)]  # empty only with a task
    prompt: Annotated[str, Text(MAX_PROMPT_CHARS, label="prompt")]
    max_tokens: Annotated[int, Int(1, MAX_NEW_TOKENS)]
    timeout_ms: Annotated[int, Int(1, MAX_TIMEOUT_MS)]
    temperature: Annotated[float, Number(0.0, 100.0)] = 0.0
    top_k: Annotated[int, Int(0, MAX_LOAD)] = 0
    top_p: Annotated[float, Number(0.0, 1.0)] = 1.0
    seed: Annotated[int | None, Int(0, MAX_SEED)] = None
    task: Annotated[str | None, Text()] = None
    selection: Annotated[str | None, Text()] = None
    context: Annotated[Mapping[str, ContextValue], ContextMap()] = field(default_factory=dict)
    strategy: DistributionStrategy | None = None  # None: the coordinator's default
    forward: bool = True

    def __post_init__(self) -> None:
        check(self)
        if self.task is None and not self.model_id:
            raise invalid(f"model_id must be 1 to {MAX_ID_LENGTH} characters")
        if self.task is not None and self.model_id:
            raise invalid("a generate request names a model_id or a task, not both")
        if not self.top_p > 0:
            raise invalid(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True, slots=True)
class GeneratedPiece(Response):
    """The tokens generated since the last piece (one, unless the reader fell behind)
    and the text they complete (may be empty while a character's bytes are coming)."""

    tokens: Annotated[
        tuple[int, ...], Items(MAX_PIECE_TOKENS, Int(0, MAX_LOAD, label="token"), min_len=1)
    ]
    text: Annotated[str, Text(MAX_PIECE_CHARS, empty=True, label="piece")]


@dataclass(frozen=True, slots=True)
class GenerateSummary(Response):
    """The end of a generation: the whole text, how many tokens, why it stopped
    ("eos" or "length"), who ran it, and its time to first token and in all."""

    job_id: Id
    model_id: Id
    text: Annotated[str, Text(MAX_TEXT_CHARS, empty=True, label="text")]
    tokens: Count
    finish: Id
    executor: Id
    ttft_ms: Annotated[float, NON_NEGATIVE]
    total_ms: Annotated[float, NON_NEGATIVE]
