"""The wire form of task jobs, select and feedback messages: round trips and refusals."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._messages import (
    VERSION,
    FeedbackReply,
    FeedbackRequest,
    Learned,
    RunRequest,
    SelectReply,
    SelectRequest,
    WireError,
)
from scheduler import ErrorCode, InferenceResult
from selection import AdvancedModelSelectionStrategy, LeftOut, RankedModel, Selection


def _pack(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _task_body(**changes: Any) -> dict[str, Any]:
    body = msgpack.unpackb(
        encode(RunRequest("job", "", {"input": np.zeros((1, 4), np.float32)}, 1000, task="t"))
    )
    body.update(changes)
    return dict(body)


def test_task_job_round_trips_with_selection_and_context() -> None:
    message = RunRequest(
        "job-7",
        "",
        {"input": np.arange(8, dtype=np.float32).reshape(2, 4)},
        5000,
        task="image-classification",
        selection="hybrid",
        context={"language": "en", "input_length": 64, "confidence": 0.8},
    )
    decoded = decode_request(encode(message))
    assert isinstance(decoded, RunRequest)
    assert (decoded.task, decoded.selection, decoded.model_id) == (
        "image-classification",
        "hybrid",
        "",
    )
    assert decoded.context == message.context
    assert type(decoded.context["input_length"]) is int
    np.testing.assert_array_equal(decoded.inputs["input"], message.inputs["input"])


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"model_id": "m"}, "not both"),
        ({"task": None, "model_id": ""}, "model_id must be 1 to"),
        ({"task": ""}, "task must be 1 to"),
        ({"context": {"a": {"nested": 1}}}, "context a must be a finite number"),
        ({"context": {"a": float("nan")}}, "finite number"),
        ({"context": {"a": "x" * 65}}, "context a must be 1 to 64"),
        ({"context": {str(i): i for i in range(17)}}, "17 keys > limit 16"),
        ({"context": [1, 2]}, "context must be a map"),
        ({"selection": 3}, "selection must be a string"),
    ],
    ids=[
        "model-and-task",
        "neither",
        "empty-task",
        "nested-context",
        "nan-context",
        "long-context-text",
        "too-many-keys",
        "context-list",
        "selection-not-text",
    ],
)
def test_bad_task_jobs_are_malformed(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(WireError, match=complaint) as caught:
        decode_request(_pack(_task_body(**changes)))
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE


def test_result_route_round_trips() -> None:
    result = InferenceResult(
        "j",
        "digits-svm",
        {"label": np.array([1, 2, 3])},
        "peer",
        0.1,
        0.2,
        route=(("digits-logreg", 2), ("digits-svm", 1)),
    )
    decoded = decode_reply(encode(result))
    assert isinstance(decoded, InferenceResult)
    assert decoded.route == result.route


def test_select_request_and_reply_round_trip() -> None:
    request = SelectRequest("image-classification", "adaptive", {"language": "en"}, k=2)
    assert decode_request(encode(request)) == request
    reply = SelectReply(
        "peer",
        Selection(
            AdvancedModelSelectionStrategy.MULTI_OBJECTIVE,
            "image-classification",
            "len<=64",
            (RankedModel("a", 0.9, ("accuracy 0.99", "cost 1")), RankedModel("b", 0.5, ())),
            (LeftOut("c", "Pareto-dominated by a"),),
        ),
        (
            Learned("a", "*", 10, 1, 2.5, 0.9, 0.97, 8.5),
            Learned("b", "len<=64", 0, 0, None, 1.0, None, 0.0),
        ),
    )
    assert decode_reply(encode(reply)) == reply


@pytest.mark.parametrize("k", [0, 65, 1.5, "2"])
def test_select_request_with_bad_k_is_malformed(k: object) -> None:
    body = msgpack.unpackb(encode(SelectRequest("t", "hybrid")))
    body["k"] = k
    with pytest.raises(WireError, match="k must be"):
        decode_request(_pack(body))


def test_feedback_round_trips() -> None:
    request = FeedbackRequest("job-1", 0.25)
    assert decode_request(encode(request)) == request
    reply = FeedbackReply("peer", "job-1", ("digits-logreg", "digits-svm"))
    assert decode_reply(encode(reply)) == reply


@pytest.mark.parametrize("score", [-0.1, 1.5, float("inf"), "1", True])
def test_feedback_score_outside_zero_one_is_malformed(score: object) -> None:
    body = {"v": VERSION, "kind": "feedback", "job_id": "j", "score": score}
    with pytest.raises(WireError) as caught:
        decode_request(_pack(body))
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE
