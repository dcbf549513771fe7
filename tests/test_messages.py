"""Wire messages check their bounds where they are built, and a new message is one
dataclass with its bounds and one registration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import numpy as np
import pytest
from test_codec_bytes import RECORD

from p2p_node import _codec
from p2p_node._codec import decode_reply, decode_request, encode, register
from p2p_node._messages import (
    MAX_TIMEOUT_MS,
    ErrorReply,
    FeedbackRequest,
    InvalidMessage,
    Learned,
    LoadReply,
    PeerReport,
    PlaceRequest,
    Request,
    RunRequest,
    SelectReply,
    SelectRequest,
    SyncRequest,
    WireError,
)
from p2p_node._schema import SPARSE, Int, Items, Text
from scheduler import DistributionStrategy, ErrorCode, JobError, Requirements
from selection import AdvancedModelSelectionStrategy, Selection

X = {"input": np.zeros((1, 4), np.float32)}


def _run(**changes: Any) -> RunRequest:
    fields: dict[str, Any] = {"job_id": "j", "model_id": "m", "inputs": X, "timeout_ms": 1000}
    fields.update(changes)
    return RunRequest(**fields)


def _select_reply(learned: Learned) -> SelectReply:
    nothing = Selection(AdvancedModelSelectionStrategy.HYBRID, "t", "*", (), ())
    return SelectReply("p", nothing, (learned,))


BAD = {
    "timeout-zero": (lambda: _run(timeout_ms=0), "timeout_ms"),
    "timeout-above-max": (lambda: _run(timeout_ms=MAX_TIMEOUT_MS + 1), "timeout_ms"),
    "timeout-float": (lambda: _run(timeout_ms=5.0), "timeout_ms must be an integer"),
    "model-and-task": (lambda: _run(task="t"), "not both"),
    "neither-model-nor-task": (lambda: _run(model_id=""), "model_id must be 1 to"),
    "job-id-too-long": (lambda: _run(job_id="j" * 129), "job_id must be 1 to 128"),
    "strategy-as-text": (lambda: _run(strategy="round_robin"), "strategy must be a Dist"),
    "provider-too-long": (
        lambda: _run(requirements=Requirements(provider="p" * 129)),
        "provider must be 1 to 128",
    ),
    "context-nan": (lambda: _run(context={"a": float("nan")}), "context a must be a finite"),
    "context-too-many": (lambda: _run(context={str(i): i for i in range(17)}), "17 keys"),
    "outputs-twice": (lambda: _run(outputs=("a", "a")), "names one output twice"),
    "outputs-with-task": (
        lambda: _run(model_id="", task="t", outputs=("a",)),
        "outputs go with a model_id",
    ),
    "hedge-not-bool": (lambda: _run(hedge=1), "hedge must be true or false"),
    "too-many-tensors": (
        lambda: _run(inputs={f"t{i}": X["input"] for i in range(65)}),
        "65 tensors > limit 64",
    ),
    "score-above-one": (lambda: FeedbackRequest("j", 1.5), "score must be a finite number in"),
    "k-zero": (lambda: SelectRequest("t", "hybrid", k=0), "k must be in [1, 64]"),
    "load-negative": (lambda: LoadReply("p", -1, 0), "in_flight must be in"),
    "sync-of-text": (lambda: SyncRequest(("signed",)), "messages must be bytes"),  # type: ignore[arg-type]
    "place-empty-model": (lambda: PlaceRequest("", DistributionStrategy.ROUND_ROBIN), "model_id"),
    "peer-report-state": (lambda: PeerReport(RECORD, 0.5, "gone"), "state must be alive"),
    "peer-report-age": (lambda: PeerReport(RECORD, -1.0, "alive"), "age_s must be"),
    "error-retry-after-nan": (
        lambda: ErrorReply(ErrorCode.OVERLOADED, "", "p", float("nan")),
        "retry_after",
    ),
    "learned-negative-runs": (
        lambda: _select_reply(Learned("m", "*", -1, 0, None, 1.0, None, 0.0)),
        "runs must be in",
    ),
    "learned-nan-latency": (
        lambda: _select_reply(Learned("m", "*", 1, 0, float("nan"), 1.0, None, 0.0)),
        "latency_ms must be a finite number",
    ),
}


@pytest.mark.parametrize(("build", "complaint"), BAD.values(), ids=BAD.keys())
def test_a_bad_message_is_refused_where_it_is_built(build: Any, complaint: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        build()
    assert caught.value.code is ErrorCode.INVALID_INPUT  # our fault, not a peer's
    assert isinstance(caught.value, JobError) and not caught.value.retryable
    assert complaint in caught.value.message


def test_the_same_check_on_a_peers_bytes_is_the_peers_fault() -> None:
    body = msgpack.unpackb(encode(_run()))
    body["timeout_ms"] = 0
    with pytest.raises(WireError) as caught:
        decode_request(msgpack.packb(body))
    assert not isinstance(caught.value, InvalidMessage)
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE
    assert "timeout_ms" in caught.value.message


def test_an_error_message_of_any_length_is_built_and_cut_when_sent() -> None:
    reply = ErrorReply(ErrorCode.INTERNAL, "x" * 10_000, "p")
    decoded = decode_reply(encode(reply))
    assert isinstance(decoded, ErrorReply) and len(decoded.message) == 4096


@dataclass(frozen=True, slots=True)
class EchoRequest(Request):
    """A message declared for this test only."""

    text: Annotated[str, Text(16)]
    times: Annotated[int, Int(1, 3)]
    tags: Annotated[tuple[str, ...], Items(4, Text(8, label="tag"), min_len=1), SPARSE] = ()


@pytest.fixture
def echo_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    for registry in ("_REQUESTS", "_REPLIES", "_KIND_OF"):
        monkeypatch.setattr(_codec, registry, dict(getattr(_codec, registry)))
    register("echo?", EchoRequest)


@pytest.mark.usefixtures("echo_registered")
def test_a_new_message_is_one_dataclass_and_one_registration() -> None:
    for message in (EchoRequest("hi", 2), EchoRequest("hi", 3, ("a", "b"))):
        payload = encode(message)
        assert decode_request(payload) == message
    assert msgpack.unpackb(encode(EchoRequest("hi", 2))) == {
        "kind": "echo?",
        "text": "hi",
        "times": 2,
        "v": 1,
    }
    with pytest.raises(InvalidMessage, match="times must be in"):
        EchoRequest("hi", 4)
    bad = {
        "times": ({"times": 9}, "times must be in [1, 3]"),
        "extra": ({"loud": True}, "unknown fields ['loud']"),
        "tag": ({"tags": ["x" * 9]}, "tag must be 1 to 8"),
        "no-tags": ({"tags": []}, "tags must be a list of 1 to 4"),
    }
    for changes, complaint in bad.values():
        body = {"v": 1, "kind": "echo?", "text": "hi", "times": 2, **changes}
        with pytest.raises(WireError) as caught:
            decode_request(msgpack.packb(body))
        assert caught.value.code is ErrorCode.MALFORMED_MESSAGE
        assert complaint in caught.value.message
    with pytest.raises(WireError, match="unexpected message kind"):
        decode_reply(encode(EchoRequest("hi", 1)))  # a request is not a reply


@pytest.mark.parametrize("wait", [float("nan"), -1.0, float("inf"), "soon"])
def test_a_handlers_error_always_becomes_a_reply(wait: object) -> None:
    error = JobError(ErrorCode.OVERLOADED, "busy", retry_after=wait)  # type: ignore[arg-type]
    reply = ErrorReply.from_error(error, "me")
    assert (reply.code, reply.retry_after) == (ErrorCode.OVERLOADED, None)
    assert decode_reply(encode(reply)) == reply
