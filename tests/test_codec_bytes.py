"""The codec derived from the messages' fields writes the bytes the hand-written one did.

`wire_golden.json` holds, as hex, the bytes that the hand-written encoder of
commit 74b97ec (`p2p_node/_wire.py`, before the messages were declared once)
wrote for each message of `rich_messages`: every kind, with its optional fields
set and unset. They were produced once, from a checkout of that commit, by

    PYTHONPATH=<checkout of 74b97ec> python tests/test_codec_bytes.py --write

and are never regenerated from the current codec: a change of the bytes fails here.
A kind added since (`stats?`, `stats`) has its bytes as the codec first wrote them,
added to the file by hand, and kept the same way.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import numpy as np
import pytest

from gossip import (
    Capabilities,
    GpuInfo,
    Load,
    ModelDescriptor,
    ModelEntry,
    ModelPerformance,
    PeerRecord,
    TensorSpec,
)
from scheduler import (
    Candidate,
    DistributionStrategy,
    ErrorCode,
    Excluded,
    GpuNeed,
    InferenceResult,
    Placement,
    Requirements,
)
from selection import AdvancedModelSelectionStrategy, LeftOut, RankedModel, Selection

GOLDEN = Path(__file__).with_name("wire_golden.json")
PEER = "12D3KooWHk8nKDdwHeEmiPmMVpZcAa1Mzv6gKhhb5pzW4v6XWbWY"


def _descriptor(model_id: str) -> ModelDescriptor:
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
        outputs=(TensorSpec("label", "int64", (None,)), TensorSpec("p", "float32", (None, 10))),
    )


RECORD = PeerRecord(
    peer_id=PEER,
    boot_id="3f9c1a0e5b7d4c2a",
    seq=41,
    issued_at=1_717_171_717.125,
    interval=120.0,
    addrs=("/ip4/192.168.1.20/tcp/4001",),
    capabilities=Capabilities(16, "EPYC", 131_072, (GpuInfo("H200", 143_771),), ("CPU",)),
    models=(ModelEntry(_descriptor("digits-mlp"), loaded=True),),
    load=Load(3, 5, 37.5, 98_304, (81.0,)),
    performance=(ModelPerformance("digits-mlp", 0.25, 0.99, 100),),
)


def _tensors() -> dict[str, np.ndarray[Any, Any]]:
    return {
        "input": np.arange(12, dtype=np.float32).reshape(3, 4),
        "big-endian": np.arange(3, dtype=">f8"),
        "mask": np.array([True, False, True]),
        "": np.int64(7).reshape(()),
        "empty": np.zeros((0, 5), np.uint8),
        "transposed": np.arange(6, dtype=np.int16).reshape(2, 3).T,
    }


def rich_messages(ns: Any) -> dict[str, object]:
    """One message of each kind and variant, built from the message classes in `ns`
    (the old `_wire` module, or the new messages), values the same either way."""
    x = _tensors()
    needs = Requirements(512, GpuNeed.REQUIRED, "CUDAExecutionProvider")
    context = {"language": "en", "input_length": 64, "confidence": 0.8}
    selection = Selection(
        AdvancedModelSelectionStrategy.MULTI_OBJECTIVE,
        "image-classification",
        "len<=64",
        (RankedModel("a", 0.9, ("accuracy 0.99", "cost 1")), RankedModel("b", 0.5, ())),
        (LeftOut("c", "Pareto-dominated by a"),),
    )
    placement = Placement(
        "m",
        (Candidate("a", -1.5, "capacity"), Candidate("b", 2.0, "turn 2")),
        (Excluded("c", "gpu"),),
    )
    result = {"label": np.array([3, 1], dtype=np.int64), "p": np.ones((2, 10), np.float32)}
    return {
        "run": ns.RunRequest("job-1", "digits-mlp", x, 5_000),
        "run-every-field": ns.RunRequest(
            "job-2",
            "digits-mlp",
            {"input": x["input"]},
            3_600_000,
            DistributionStrategy.CAPABILITY_BASED,
            needs,
            context=context,
            hedge=True,
            outputs=("p", "label"),
        ),
        "run-task": ns.RunRequest(
            "job-3", "", x, 1, task="image-classification", selection="hybrid", context=context
        ),
        "models?": ns.ModelsRequest(),
        "peers?": ns.PeersRequest(),
        "load?": ns.LoadRequest(),
        "sync?": ns.SyncRequest((b"signed", b"")),
        "sync?-empty": ns.SyncRequest(()),
        "place?": ns.PlaceRequest("digits-mlp", DistributionStrategy.LEAST_LOADED),
        "place?-requires": ns.PlaceRequest("m", DistributionStrategy.ROUND_ROBIN, needs),
        "select?": ns.SelectRequest("image-classification", "hybrid"),
        "select?-every-field": ns.SelectRequest("t", "adaptive", context, 3),
        "feedback": ns.FeedbackRequest("job-1", 0.25),
        "feedback-int-score": ns.FeedbackRequest("job-1", 1),
        "result": InferenceResult("job-1", "digits-mlp", result, PEER, 0.25, 1.5),
        "result-every-field": InferenceResult(
            "job-1", "b", result, PEER, 0, 3, (("a", 2), ("b", 0)), load=41
        ),
        "error": ns.ErrorReply(ErrorCode.OVERLOADED, "queue full", PEER),
        "error-retry-after": ns.ErrorReply(ErrorCode.OVERLOADED, "slow down", "p", 1),
        "error-empty": ns.ErrorReply(ErrorCode.UNKNOWN_MODEL, "", ""),
        "error-cut": ns.ErrorReply(ErrorCode.INTERNAL, "ünïcödé ✓" * 1000, PEER, 0.25),
        "models": ns.ModelsReply(PEER, (_descriptor("a"), _descriptor("b"))),
        "models-none": ns.ModelsReply(PEER, ()),
        "peers": ns.PeersReply(
            PEER, (ns.PeerReport(RECORD, 0.5, "alive"), ns.PeerReport(RECORD, 12.0, "suspect"))
        ),
        "peers-none": ns.PeersReply(PEER, ()),
        "load": ns.LoadReply(PEER, 2, 7),
        "sync": ns.SyncReply((b"\x00" * 40,)),
        "place": ns.PlaceReply(PEER, placement),
        "place-nobody": ns.PlaceReply(PEER, Placement("m", ())),
        "select": ns.SelectReply(
            PEER,
            selection,
            (
                ns.Learned("a", "*", 10, 1, 2.5, 0.9, 0.97, 8.5),
                ns.Learned("b", "len<=64", 0, 0, None, 1.0, None, 0.0),
            ),
        ),
        "select-nothing": ns.SelectReply(
            PEER, Selection(AdvancedModelSelectionStrategy.HYBRID, "t", "*", (), ()), ()
        ),
        "feedback!": ns.FeedbackReply(PEER, "job-1", ("digits-logreg", "digits-svm")),
        **_since_the_hand_written_codec(ns),
    }


def _since_the_hand_written_codec(ns: ModuleType) -> dict[str, object]:
    """Kinds the hand-written codec never had."""
    if not hasattr(ns, "StatsReply"):
        return {}
    return {
        "stats?": ns.StatsRequest(),
        "stats": ns.StatsReply(
            PEER, 1, 4, (ns.ModelStats("digits-mlp", 12, 1, 0.25, 3.5), ns.ModelStats("m", 0, 0))
        ),
    }


def _new_messages() -> dict[str, object]:
    from p2p_node import _messages

    return rich_messages(_messages)


# Kinds added after the hand-written codec: no golden bytes; their round trips are
# tested beside their protocols (tests/test_generation_stream.py).
NEWER_KINDS = frozenset({"generate", "piece", "generated", "digest?", "digest"})

# The cases, by the golden file's names (a case missing there fails the first test).
NAMES = sorted(json.loads(GOLDEN.read_text())) if GOLDEN.exists() else []


@pytest.fixture(scope="module")
def golden() -> dict[str, bytes]:
    return {name: bytes.fromhex(text) for name, text in json.loads(GOLDEN.read_text()).items()}


def test_the_golden_bytes_hold_every_message_and_every_kind(golden: dict[str, bytes]) -> None:
    from p2p_node._codec import _REPLIES, _REQUESTS

    assert set(golden) == set(_new_messages())
    kinds = {msgpack.unpackb(payload)["kind"] for payload in golden.values()}
    # a new kind: add it to rich_messages, or to NEWER_KINDS with its own round trip test
    assert kinds == (set(_REQUESTS) | set(_REPLIES)) - NEWER_KINDS


@pytest.mark.parametrize("name", NAMES)
def test_each_message_encodes_to_the_bytes_of_the_hand_written_codec(
    golden: dict[str, bytes], name: str
) -> None:
    from p2p_node._codec import encode

    assert encode(_new_messages()[name]).hex() == golden[name].hex()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_what_the_codec_reads_from_the_golden_bytes_it_writes_back_the_same(
    golden: dict[str, bytes], name: str
) -> None:
    from p2p_node._codec import _REQUESTS, decode_reply, decode_request, encode

    payload = golden[name]
    kind = msgpack.unpackb(payload)["kind"]
    message = (decode_request if kind in _REQUESTS else decode_reply)(payload)
    assert encode(message) == payload


def test_the_pure_codec_imports_no_network_code() -> None:
    """The messages and their codec import nothing of libp2p or trio (directly or
    through another p2p_node module but each other)."""
    allowed = {"gossip", "scheduler", "selection", "numpy", "msgpack", "p2p_node"}
    package = Path(__file__).parents[1] / "p2p_node"
    pure = {"_schema", "_messages", "_codec", "_large"}
    for name in sorted(pure):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in pure, f"{name} imports .{node.module}"
            elif isinstance(node, ast.ImportFrom | ast.Import):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else []
                modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for module in modules:
                    top = (module or "").split(".")[0]
                    assert top in allowed or top in sys.stdlib_module_names, (name, module)


def _write_golden(old_wire: ModuleType) -> None:
    messages = rich_messages(old_wire)
    hexed = {name: old_wire.encode(message).hex() for name, message in messages.items()}
    GOLDEN.write_text(json.dumps(hexed, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    from p2p_node import _wire  # type: ignore[attr-defined]  # only in commit 74b97ec

    print(f"writing {GOLDEN} from {_wire.__file__}")
    _write_golden(_wire)
