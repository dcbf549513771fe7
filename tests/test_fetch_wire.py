"""The fetch protocol's messages and manifests: round trips, and every malformed form
refused with a typed error (pure: no node)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_node import bundled_models_dir
from p2p_node._config import ConfigError, FetchConfig, parse_fetch_target
from p2p_node._download import matches
from p2p_node._manifest import (
    CHUNK_BYTES,
    ChunkAsk,
    FetchWireError,
    FileEntry,
    Manifest,
    ManifestAsk,
    Progress,
    ProgressAsk,
    Refusal,
    build_manifest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from scheduler import ErrorCode

SHA = "ab" * 32
MINILM = bundled_models_dir() / "minilm-l6-v2"


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_the_manifest_of_minilm_lists_its_files_and_chunks() -> None:
    manifest = build_manifest(MINILM, "minilm-l6-v2")
    onnx = (MINILM / "model.onnx").read_bytes()
    assert manifest.model_sha256 == hashlib.sha256(onnx).hexdigest()
    assert {f.name for f in manifest.files} == {p.name for p in MINILM.iterdir()}
    entry = manifest.file("model.onnx")
    assert len(entry.chunks) == -(-len(onnx) // CHUNK_BYTES)
    assert entry.chunks[1] == hashlib.sha256(onnx[CHUNK_BYTES : 2 * CHUNK_BYTES]).hexdigest()
    assert manifest.total_bytes > 20 * (1 << 20)
    assert manifest.memory_bytes == manifest.total_bytes - (MINILM / "model.toml").stat().st_size
    assert Manifest.from_wire(manifest.to_wire()) == manifest
    assert decode_reply(encode_reply(manifest)) == manifest


@pytest.mark.parametrize(
    "message",
    [
        ManifestAsk("minilm-l6-v2", SHA),
        ChunkAsk(SHA, 0),
        ChunkAsk(SHA, 21),
        ProgressAsk(),
    ],
)
def test_requests_round_trip(message: object) -> None:
    assert decode_request(encode_request(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply",
    [
        b"chunk bytes",
        b"",
        (),
        (Progress("m", "fetching", 10, 20, 2), Progress("n", "done", 5, 5, 0)),
        Refusal(ErrorCode.UNKNOWN_MODEL, "no such model"),
    ],
)
def test_replies_round_trip(reply: object) -> None:
    assert decode_reply(encode_reply(reply)) == reply  # type: ignore[arg-type]


BAD_REQUESTS = {
    "not msgpack": b"\xc1",
    "truncated": pack({"kind": "chunk", "file": SHA, "index": 1})[:-3],
    "trailing bytes": pack({"kind": "progress"}) + b"\x00",
    "a list": pack(["chunk", SHA, 0]),
    "no kind": pack({"file": SHA, "index": 0}),
    "unknown kind": pack({"kind": "delete", "file": SHA}),
    "extra field": pack({"kind": "progress", "x": 1}),
    "missing field": pack({"kind": "chunk", "file": SHA}),
    "short sha": pack({"kind": "chunk", "file": "ab", "index": 0}),
    "upper-case sha": pack({"kind": "chunk", "file": SHA.upper(), "index": 0}),
    "sha as bytes": pack({"kind": "chunk", "file": SHA.encode(), "index": 0}),
    "negative index": pack({"kind": "chunk", "file": SHA, "index": -1}),
    "huge index": pack({"kind": "chunk", "file": SHA, "index": 2**62}),
    "float index": pack({"kind": "chunk", "file": SHA, "index": 1.0}),
    "bool index": pack({"kind": "chunk", "file": SHA, "index": True}),
    "empty model id": pack({"kind": "manifest", "model_id": "", "sha256": SHA}),
    "long model id": pack({"kind": "manifest", "model_id": "m" * 129, "sha256": SHA}),
    "int keys": msgpack.packb({1: 2}),
    "deep nesting": b"\x91" * 100_000,
}


@pytest.mark.parametrize("payload", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(FetchWireError) as caught:
        decode_request(payload)
    assert caught.value.code is ErrorCode.MALFORMED_MESSAGE


def good_manifest() -> dict[str, object]:
    return {
        "model_id": "m",
        "model_sha256": SHA,
        "chunk_bytes": CHUNK_BYTES,
        "files": [["model.onnx", 10, SHA, [SHA]], ["model.toml", 0, "cd" * 32, []]],
    }


def changed(**fields: object) -> dict[str, object]:
    return {**good_manifest(), **fields}


BAD_MANIFESTS = {
    "path in a name": changed(files=[["../model.onnx", 10, SHA, [SHA]]]),
    "hidden name": changed(files=[[".x", 1, SHA, [SHA]], *good_manifest()["files"]]),  # type: ignore[misc]
    "no model.toml": changed(files=[["model.onnx", 10, SHA, [SHA]]]),
    "onnx of another hash": changed(model_sha256="cd" * 32),
    "chunks short": changed(files=[["model.onnx", 10, SHA, []], ["model.toml", 0, SHA, []]]),
    "a name twice": changed(files=[["model.onnx", 10, SHA, [SHA]]] * 2),
    "negative size": changed(files=[["model.onnx", -1, SHA, []], ["model.toml", 0, SHA, []]]),
    "tiny chunks": changed(chunk_bytes=1),
    "no files": changed(files=[]),
    "a file not a list": changed(files=["model.onnx"]),
    "extra field": changed(signed=True),
    "not a map": [1, 2],
    "itself listed": changed(
        files=[*good_manifest()["files"], ["manifest.json", 0, SHA, []]]  # type: ignore[misc]
    ),
}


@pytest.mark.parametrize("value", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_malformed_manifests_are_refused(value: object) -> None:
    assert Manifest.from_wire(good_manifest()).model_id == "m"
    with pytest.raises(FetchWireError):
        Manifest.from_wire(value)
    with pytest.raises(FetchWireError):
        decode_reply(pack({"kind": "manifest", "manifest": value}))


@given(st.binary(max_size=200))
def test_no_bytes_break_the_decoders(payload: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(FetchWireError):
            decode(payload)


def test_a_refusal_of_an_unknown_code_reads_as_internal() -> None:
    reply = decode_reply(pack({"kind": "error", "code": 999, "message": "?"}))
    assert reply == Refusal(ErrorCode.INTERNAL, "?")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("minilm-l6-v2", ("minilm-l6-v2", None)),
        ("gpt@1", ("gpt", 0)),
        ("gpt@12", ("gpt", 11)),
        ("minilm-l6-v2@2of2", ("minilm-l6-v2@2of2", None)),  # a stage model's own id
        ("a@b@3", ("a@b", 2)),
    ],
)
def test_fetch_targets(text: str, parsed: tuple[str, int | None]) -> None:
    assert parse_fetch_target(text) == parsed
    assert FetchConfig(models=(text,)).models == (text,)


@pytest.mark.parametrize("text", ["", "@1", "gpt@", "gpt@0", "a/b", "x" * 129, "a\nb"])
def test_bad_fetch_targets_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_fetch_target(text)


def test_file_entries_count_their_chunks(tmp_path: Path) -> None:
    assert FileEntry("x", 0, SHA, ()).chunk_count(CHUNK_BYTES) == 0
    assert FileEntry("x", CHUNK_BYTES + 1, SHA, ()).chunk_count(CHUNK_BYTES) == 2


def test_a_stage_target_matches_the_entry_of_that_stage_only() -> None:
    """`MODEL@STAGE` matches a record entry whose stage names that parent and index.
    (A stand-in entry: records carry `stage` once issue 16's stage records are in.)"""
    descriptor = SimpleNamespace(id="gpt.stage1")
    whole = SimpleNamespace(descriptor=SimpleNamespace(id="gpt"), stage=None)
    stage1 = SimpleNamespace(descriptor=descriptor, stage=SimpleNamespace(parent="gpt", index=1))
    stage0 = SimpleNamespace(descriptor=descriptor, stage=SimpleNamespace(parent="gpt", index=0))
    other = SimpleNamespace(descriptor=descriptor, stage=SimpleNamespace(parent="bert", index=1))
    assert matches(whole, "gpt", None) and not matches(whole, "gpt", 1)  # type: ignore[arg-type]
    assert matches(stage1, "gpt", 1)  # type: ignore[arg-type]
    assert not any(matches(e, "gpt", 1) for e in (stage0, other))  # type: ignore[arg-type]
    assert matches(stage1, "gpt.stage1", None)  # type: ignore[arg-type]
