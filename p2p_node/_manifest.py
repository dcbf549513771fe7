"""A model's file manifest, and the messages of the fetch protocol. Pure: no trio, no libp2p.

A model is fetched by content: its record announces the sha256 of its
`model.onnx`; a fetcher asks a peer for the manifest of (model id, that
sha256), and the manifest lists every file of the model directory with its
size, its sha256 and the sha256 of each of its chunks. A manifest whose
`model.onnx` does not have the announced hash is refused, and so is every
chunk whose hash is not the manifest's: nothing is trusted for its name.

The messages are msgpack maps with a `kind`; every field is checked, unknown
fields are refused. Anything malformed raises `FetchWireError`, which the
server answers as MALFORMED_MESSAGE.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from scheduler import ErrorCode

from ._schema import MAX_ID_LENGTH

CHUNK_BYTES = 1 << 20  # a fetch moves files in pieces of this size
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 8 << 20
MAX_FILES = 64  # files in one model directory
MAX_FILE_BYTES = 1 << 40
MAX_NAME_LENGTH = 255
MAX_REQUEST_BYTES = 1024  # every fetch request is small
MAX_MESSAGE_LENGTH = 4096
MODEL_FILE = "model.onnx"
CARD_FILE = "model.toml"
MANIFEST_FILE = "manifest.json"  # beside a fetched model's files; not one of them
_SHA256_HEX = re.compile(r"[0-9a-f]{64}").fullmatch


class FetchWireError(ValueError):
    """A fetch message, or a manifest, is malformed; `code` is what the sender is told."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha(label: str, value: object) -> str:
    if type(value) is not str or not _SHA256_HEX(value):
        raise FetchWireError(f"{label} must be 64 lowercase hex digits")
    return value


def _int(label: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FetchWireError(f"{label} must be an integer in [{lo}, {hi}]")
    return value


def _text(label: str, value: object, limit: int = MAX_ID_LENGTH) -> str:
    if type(value) is not str or not 0 < len(value) <= limit:
        raise FetchWireError(f"{label} must be 1 to {limit} characters")
    return value


def check_file_name(name: object) -> str:
    """A plain file name in a model directory: no path, nothing hidden."""
    text = _text("file name", name, MAX_NAME_LENGTH)
    if (
        Path(text).name != text
        or text.startswith(".")
        or "/" in text
        or "\\" in text
        or not text.isprintable()
    ):
        raise FetchWireError(f"file name {text!r} is not a plain file name")
    return text


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model: its name in the directory, size, hash, and chunk hashes."""

    name: str
    size: int
    sha256: str
    chunks: tuple[str, ...]

    def chunk_count(self, chunk_bytes: int) -> int:
        return math.ceil(self.size / chunk_bytes)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Every file of model `model_id`, whose `model.onnx` hashes to `model_sha256`."""

    model_id: str
    model_sha256: str
    chunk_bytes: int
    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        _text("model id", self.model_id)
        _sha("model sha256", self.model_sha256)
        _int("chunk_bytes", self.chunk_bytes, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        if not 0 < len(self.files) <= MAX_FILES:
            raise FetchWireError(f"a manifest lists 1 to {MAX_FILES} files")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise FetchWireError(f"manifest of {self.model_id} names a file twice")
        for entry in self.files:
            check_file_name(entry.name)
            _int(f"size of {entry.name}", entry.size, 0, MAX_FILE_BYTES)
            _sha(f"sha256 of {entry.name}", entry.sha256)
            if len(entry.chunks) != entry.chunk_count(self.chunk_bytes):
                raise FetchWireError(f"{entry.name}: chunk hashes do not cover its size")
            for chunk in entry.chunks:
                _sha(f"chunk hash of {entry.name}", chunk)
        if {MODEL_FILE, CARD_FILE} - set(names) or MANIFEST_FILE in names:
            raise FetchWireError(f"a manifest lists {MODEL_FILE} and {CARD_FILE}, never itself")
        if self.file(MODEL_FILE).sha256 != self.model_sha256:
            raise FetchWireError(
                f"manifest of {self.model_id}: {MODEL_FILE} does not hash to the model's sha256"
            )

    def file(self, name: str) -> FileEntry:
        return next(f for f in self.files if f.name == name)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def memory_bytes(self) -> int:
        """What it counts against a memory budget before its model.toml is read: its
        files but model.toml (`ModelCard.memory_bytes`' proxy)."""
        return sum(f.size for f in self.files if f.name != CARD_FILE)

    @property
    def digest(self) -> str:
        """The sha256 of its wire form: equal manifests, equal digests."""
        return sha256_hex(msgpack.packb(self.to_wire(), use_bin_type=True))

    def to_wire(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_sha256": self.model_sha256,
            "chunk_bytes": self.chunk_bytes,
            "files": [[f.name, f.size, f.sha256, list(f.chunks)] for f in self.files],
        }

    @classmethod
    def from_wire(cls, value: object) -> Manifest:
        fields = _fields(value, "manifest", {"model_id", "model_sha256", "chunk_bytes", "files"})
        files = fields["files"]
        if not isinstance(files, list) or len(files) > MAX_FILES:
            raise FetchWireError(f"manifest files must be a list of at most {MAX_FILES}")
        entries = []
        for item in files:
            if not isinstance(item, list) or len(item) != 4 or not isinstance(item[3], list):
                raise FetchWireError("a manifest file is [name, size, sha256, [chunk sha256]]")
            name, size, sha, chunks = item
            if len(chunks) > MAX_FILE_BYTES // MIN_CHUNK_BYTES:
                raise FetchWireError("too many chunks")
            entries.append(FileEntry(name, size, sha, tuple(chunks)))
        return cls(
            fields["model_id"], fields["model_sha256"], fields["chunk_bytes"], tuple(entries)
        )


def _fields(value: object, what: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        got = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise FetchWireError(f"{what} must have exactly the fields {sorted(keys)}, got {got}")
    return value


def hash_file(path: Path, chunk_bytes: int) -> tuple[int, str, tuple[str, ...]]:
    """(size, sha256, chunk sha256s) of the file at `path`."""
    whole = hashlib.sha256()
    chunks = []
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            whole.update(block)
            chunks.append(sha256_hex(block))
            size += len(block)
    return size, whole.hexdigest(), tuple(chunks)


def build_manifest(model_dir: Path, model_id: str, chunk_bytes: int = CHUNK_BYTES) -> Manifest:
    """The manifest of the model in `model_dir` (reads and hashes every file: call it
    in a worker thread). Its regular files, links followed, hidden ones left out."""
    entries = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(".") or path.name == MANIFEST_FILE or not path.is_file():
            continue
        entries.append(FileEntry(path.name, *hash_file(path, chunk_bytes)))
    return Manifest(model_id, _model_sha(entries), chunk_bytes, tuple(entries))


def _model_sha(entries: list[FileEntry]) -> str:
    for entry in entries:
        if entry.name == MODEL_FILE:
            return entry.sha256
    raise FetchWireError(f"no {MODEL_FILE}")


# --- the messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestAsk:
    """The manifest of `model_id` whose model.onnx hashes to `sha256`, please."""

    model_id: str
    sha256: str


@dataclass(frozen=True, slots=True)
class ChunkAsk:
    """Chunk `index` of the file that hashes to `file_sha256`, please."""

    file_sha256: str
    index: int


@dataclass(frozen=True, slots=True)
class ProgressAsk:
    """Which fetches are you running?"""


@dataclass(frozen=True, slots=True)
class Progress:
    """One fetch as `p2p-node peers` shows it."""

    model_id: str
    state: str  # "fetching", "done", or "failed: <why>"
    done_bytes: int
    total_bytes: int
    peers: int  # peers it is fetching from now

    def to_wire(self) -> list[Any]:
        return [self.model_id, self.state, self.done_bytes, self.total_bytes, self.peers]

    @classmethod
    def from_wire(cls, value: object) -> Progress:
        if not isinstance(value, list) or len(value) != 5:
            raise FetchWireError("a progress entry is [model, state, done, total, peers]")
        model, state, done, total, peers = value
        return cls(
            _text("model id", model),
            _text("state", state, MAX_MESSAGE_LENGTH),
            _int("done bytes", done, 0, MAX_FILE_BYTES * MAX_FILES),
            _int("total bytes", total, 0, MAX_FILE_BYTES * MAX_FILES),
            _int("peers", peers, 0, 1 << 20),
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the server will not answer, and why."""

    code: ErrorCode
    message: str


FetchRequest = ManifestAsk | ChunkAsk | ProgressAsk


def encode_request(request: FetchRequest) -> bytes:
    if isinstance(request, ManifestAsk):
        body: dict[str, Any] = {"model_id": request.model_id, "sha256": request.sha256}
        kind = "manifest"
    elif isinstance(request, ChunkAsk):
        body, kind = {"file": request.file_sha256, "index": request.index}, "chunk"
    else:
        body, kind = {}, "progress"
    packed: bytes = msgpack.packb({"kind": kind, **body}, use_bin_type=True)
    return packed


def decode_request(payload: bytes) -> FetchRequest:
    """The request in `payload`; FetchWireError for anything else."""
    value = _unpack(payload)
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "manifest":
        fields = _fields(value, "a manifest request", {"kind", "model_id", "sha256"})
        return ManifestAsk(_text("model id", fields["model_id"]), _sha("sha256", fields["sha256"]))
    if kind == "chunk":
        fields = _fields(value, "a chunk request", {"kind", "file", "index"})
        return ChunkAsk(
            _sha("file", fields["file"]),
            _int("index", fields["index"], 0, MAX_FILE_BYTES // MIN_CHUNK_BYTES),
        )
    if kind == "progress":
        _fields(value, "a progress request", {"kind"})
        return ProgressAsk()
    raise FetchWireError("a fetch request's kind is manifest, chunk or progress")


# Replies: the manifest, a chunk's bytes, the fetches in progress, or a refusal.
Reply = Manifest | bytes | tuple[Progress, ...] | Refusal


def encode_reply(reply: Reply) -> bytes:
    if isinstance(reply, Manifest):
        body: dict[str, Any] = {"kind": "manifest", "manifest": reply.to_wire()}
    elif isinstance(reply, bytes):
        body = {"kind": "chunk", "data": reply}
    elif isinstance(reply, Refusal):
        message = reply.message[:MAX_MESSAGE_LENGTH] or "refused"
        body = {"kind": "error", "code": int(reply.code), "message": message}
    else:
        body = {"kind": "progress", "fetches": [p.to_wire() for p in reply]}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_reply(payload: bytes) -> Reply:
    """The reply in `payload`; FetchWireError for anything else."""
    value = _unpack(payload)
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "manifest":
        return Manifest.from_wire(
            _fields(value, "a manifest reply", {"kind", "manifest"})["manifest"]
        )
    if kind == "chunk":
        data = _fields(value, "a chunk reply", {"kind", "data"})["data"]
        if type(data) is not bytes:
            raise FetchWireError("a chunk reply carries bytes")
        return data
    if kind == "progress":
        fetches = _fields(value, "a progress reply", {"kind", "fetches"})["fetches"]
        if not isinstance(fetches, list) or len(fetches) > 1024:
            raise FetchWireError("fetches must be a list")
        return tuple(Progress.from_wire(p) for p in fetches)
    if kind == "error":
        fields = _fields(value, "an error reply", {"kind", "code", "message"})
        try:
            code = ErrorCode(fields["code"])
        except ValueError:
            code = ErrorCode.INTERNAL
        return Refusal(code, _text("message", fields["message"], MAX_MESSAGE_LENGTH))
    raise FetchWireError("a fetch reply's kind is manifest, chunk, progress or error")


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise FetchWireError("not a msgpack message") from None
    except RecursionError:
        raise FetchWireError("nested too deep") from None
