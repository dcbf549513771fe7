"""Models shared by content: the fetch protocol's server, and a node fetching a model.

`/p2p-node/fetch/1.0.0` carries requests and replies in turn on one stream
(varint frames, `_manifest`'s messages): a manifest by (model id, sha256 of
its model.onnx as records announce it), a chunk by (file sha256, index), or
the fetches in progress. A node answers only for the models it announces; a
chunk is read from disk and checked against its hash before it goes out.

A node told to `--fetch` a model waits for peers announcing it, takes a
manifest whose model.onnx hashes as announced, refuses a model over its size
limit or its memory budget, then pulls chunks from every announcing peer at
once (`streams_per_peer` streams each). A chunk whose hash is not the
manifest's is fetched again from another peer, and the peer that sent it is
dropped; a peer that dies or refuses leaves its chunk to the others. Every
file's hash is checked again before the model is moved into
`<data dir>/models/<id>/` (with its manifest) and served; a node loads what is
there at start, after checking it the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from gossip import ModelDescriptor, ViewSnapshot
from scheduler import ErrorCode, JobError

from ._channel import TRANSPORT_ERRORS, Channel
from ._config import parse_fetch_target
from ._errors import unwrap_single_errors
from ._framing import FrameError
from ._manifest import (
    CHUNK_BYTES,
    MANIFEST_FILE,
    MAX_REQUEST_BYTES,
    ChunkAsk,
    FetchRequest,
    FetchWireError,
    FileEntry,
    Manifest,
    ManifestAsk,
    Progress,
    ProgressAsk,
    Refusal,
    Reply,
    build_manifest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    hash_file,
    sha256_hex,
)
from ._repository import ModelCard, RepositoryError, read_model_card

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

FETCH_PROTOCOL = TProtocol("/p2p-node/fetch/1.0.0")
IDLE_S = 60.0  # a fetch stream with no request for this long is closed
MAX_REPLY_OVERHEAD = 64 * 1024  # a chunk reply's frame: the chunk plus this
MB = 1 << 20

Tamper = Callable[[str, int, bytes], bytes]  # (file sha256, chunk index, data) -> sent


class FetchFailure(StrEnum):
    NO_PEER = "no peer"  # none announces it, or every one failed
    TOO_LARGE = "too large"  # over the node's fetch size limit
    OVER_BUDGET = "over budget"  # over the node's model memory budget
    BAD_MODEL = "bad model"  # fetched and verified, but it does not load


class FetchError(Exception):
    """A fetch that did not end in a served model; `failure` says which way."""

    def __init__(self, failure: FetchFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


@dataclass(slots=True)
class _Progress:
    model_id: str
    state: str = "finding peers"
    done_bytes: int = 0
    total_bytes: int = 0
    peers: set[str] = field(default_factory=set)
    download_s: float = 0.0  # from the first manifest to the last chunk checked
    bytes_from: dict[str, int] = field(default_factory=dict)  # by peer: chunks it gave

    def frozen(self) -> Progress:
        state = self.state[:1000] or "?"
        return Progress(self.model_id, state, self.done_bytes, self.total_bytes, len(self.peers))


# --- serving ----------------------------------------------------------------------------


class FetchService:
    """One node's side of the fetch protocol: it answers peers, and fetches for itself."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._manifests: dict[str, Manifest] = {}  # by model id, for served models
        self._files: dict[str, tuple[Path, FileEntry, int]] = {}  # by sha256: path, entry, chunk
        self._building = trio.Lock()
        self.progress: dict[str, _Progress] = {}  # by what --fetch named
        self.tamper: Tamper | None = None  # tests: change a chunk after it was checked
        self.refused: dict[ErrorCode, int] = {}
        self.corrupt_chunks = 0  # chunks from peers that did not match their hash
        self.served_chunks = 0  # chunks this node sent to peers
        self._ended: set[str] = set()  # targets of fetch_all, once they end
        self._ending = trio.lowlevel.ParkingLot()

    async def serve(self, stream: INetStream) -> None:
        """Answer requests on `stream` in turn until the peer closes it."""
        peer = str(stream.muxed_conn.peer_id)
        channel = Channel(stream, MAX_REQUEST_BYTES)
        try:
            while True:
                with trio.fail_after(IDLE_S):
                    payload = await channel.receive()
                await channel.send(encode_reply(await self._answer(payload, peer)))
        except EOFError:
            await channel.close()
        except FrameError as error:
            self._count(ErrorCode.MESSAGE_TOO_LARGE)
            logger.debug("fetch stream from %s: %s", peer, error)
            await channel.discard()
        except (trio.TooSlowError, *TRANSPORT_ERRORS) as error:
            logger.debug("fetch stream from %s ended: %r", peer, error)
            await channel.discard()

    async def _answer(self, payload: bytes, peer: str) -> Reply:
        try:
            request = decode_request(payload)
            if not isinstance(request, ProgressAsk) and not self._admits(peer):
                raise JobError(
                    ErrorCode.UNAUTHORIZED,
                    f"peer {peer} may not fetch from this node; ask its operator to add it "
                    "with --allow-client",
                )
            return await self._reply(request)
        except FetchWireError as error:
            return self._refuse(error.code, str(error))
        except JobError as error:
            return self._refuse(error.code, error.message)
        except Exception:  # a bug: the peer still gets an answer, the node goes on
            logger.exception("fetch request from %s failed", peer)
            return self._refuse(ErrorCode.INTERNAL, "internal error; see the node's log")

    def _admits(self, sender: str) -> bool:
        """As for work placed here: a peer of the network, or an allowed client."""
        return sender in self._node.view.snapshot().peers or self._node.admission.allows(sender)

    async def _reply(self, request: FetchRequest) -> Reply:
        if isinstance(request, ProgressAsk):
            return tuple(p.frozen() for p in self.progress.values())
        if isinstance(request, ManifestAsk):
            manifest = await self._manifest(request.model_id)
            if manifest is None or manifest.model_sha256 != request.sha256:
                raise JobError(
                    ErrorCode.UNKNOWN_MODEL,
                    f"this node announces no model {request.model_id} of sha256 "
                    f"{request.sha256[:12]}...",
                )
            return manifest
        return await self._chunk(request)

    async def _manifest(self, model_id: str) -> Manifest | None:
        """The manifest of served model `model_id` (built once, in a worker thread)."""
        card = self._node.executor.models.card(model_id)
        if card is None:
            return None
        async with self._building:
            manifest = self._manifests.get(model_id)
            if manifest is None:
                model_dir = card.onnx_path.parent
                manifest = await trio.to_thread.run_sync(build_manifest, model_dir, model_id)
                self._manifests[model_id] = manifest
                for entry in manifest.files:
                    self._files[entry.sha256] = (model_dir / entry.name, entry, CHUNK_BYTES)
        return manifest

    async def _chunk(self, request: ChunkAsk) -> bytes:
        found = self._files.get(request.file_sha256)
        if found is None:  # maybe of a served model whose manifest nobody asked for yet
            for model_id in self._node.executor.models.ids():
                await self._manifest(model_id)
            found = self._files.get(request.file_sha256)
        if found is None:
            raise JobError(
                ErrorCode.UNKNOWN_MODEL,
                f"no file of sha256 {request.file_sha256[:12]}... in a model this node announces",
            )
        path, entry, chunk_bytes = found
        if request.index >= len(entry.chunks):
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"{entry.name} has {len(entry.chunks)} chunks; asked for chunk {request.index}",
            )
        data = await trio.to_thread.run_sync(_read_checked, path, entry, request.index, chunk_bytes)
        self.served_chunks += 1
        if self.tamper is not None:
            data = self.tamper(entry.sha256, request.index, data)
        return data

    def _refuse(self, code: ErrorCode, message: str) -> Refusal:
        self._count(code)
        return Refusal(code, message)

    def _count(self, code: ErrorCode) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    # --- fetching --------------------------------------------------------------------

    async def fetch_all(self, targets: Iterable[str]) -> None:
        """Fetch and serve each of `targets` this node does not serve yet; a failure is
        logged and shown in the progress, and the node goes on without that model."""
        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(self._fetch_and_serve, target)

    async def _fetch_and_serve(self, target: str) -> None:
        try:
            await self.fetch(target)
        except FetchError as error:
            self.progress[target].state = f"failed: {error.message}"
            logger.error("could not fetch %s: %s", target, error.message)
        finally:
            self._ended.add(target)
            self._ending.unpark_all()

    async def wait_ended(self, target: str) -> Progress:
        """Until the fetch of `target` that the node started with has ended, served or failed."""
        while target not in self._ended:
            await self._ending.park()
        return self.progress[target].frozen()

    async def fetch(self, target: str) -> str:
        """Fetch `target` (`MODEL_ID` or `MODEL_ID@STAGE`) and serve it; its model id.
        A model served already is not fetched again. Raises FetchError."""
        progress = self.progress[target] = _Progress(target)
        model_id, stage = parse_fetch_target(target)
        if stage is None and self._node.executor.serves(model_id):
            progress.state = "done"
            return model_id
        node, config = self._node, self._node.config.fetch
        with trio.move_on_after(config.find_timeout):
            await node.view.wait_until(lambda v: bool(announcers(v, model_id, stage)))
        found = announcers(node.view.snapshot(), model_id, stage)
        if not found:
            raise FetchError(FetchFailure.NO_PEER, f"no peer announces {target}")
        descriptor = _most_announced(found)
        progress.model_id = descriptor.id
        if node.executor.serves(descriptor.id):
            progress.state = "done"
            return descriptor.id
        fetch = _Fetch(self, descriptor, progress)
        model_dir = await fetch.run()
        try:
            card = read_model_card(model_dir)
            await node.serve_model(card)
        except (RepositoryError, ValueError) as error:
            shutil.rmtree(model_dir, ignore_errors=True)
            failure = FetchFailure.OVER_BUDGET if "budget" in str(error) else FetchFailure.BAD_MODEL
            raise FetchError(failure, str(error)) from None
        progress.state = "done"
        logger.info("fetched %s (%d bytes) and serving it", descriptor.id, progress.total_bytes)
        return descriptor.id


def _read_checked(path: Path, entry: FileEntry, index: int, chunk_bytes: int) -> bytes:
    """Chunk `index` of the file at `path`, if it still hashes as its manifest says."""
    with path.open("rb") as f:
        f.seek(index * chunk_bytes)
        data = f.read(chunk_bytes)
    if sha256_hex(data) != entry.chunks[index]:
        logger.error("%s changed on disk since its manifest was made: not serving it", path)
        raise JobError(ErrorCode.INTERNAL, f"{entry.name} changed on the serving node's disk")
    return data


def announcers(view: ViewSnapshot, model_id: str, stage: int | None) -> dict[str, ModelDescriptor]:
    """Alive peers announcing `model_id` (or stage `stage` of it), with what they announce."""
    found = {}
    for peer in view.alive():
        for entry in peer.record.models:
            if _matches(entry.descriptor, model_id, stage):
                found[peer.record.peer_id] = entry.descriptor
    return found


def _matches(descriptor: ModelDescriptor, model_id: str, stage: int | None) -> bool:
    if stage is None:
        return descriptor.id == model_id
    # A stage's record names its parent model and its index (issue 16's stage fields);
    # a record without them is no stage of anything.
    parent, index = getattr(descriptor, "parent", None), getattr(descriptor, "stage", None)
    return parent == model_id and index == stage


def _most_announced(found: dict[str, ModelDescriptor]) -> ModelDescriptor:
    """The (id, sha256) most peers announce (ties: the first by sha256)."""
    counts: dict[tuple[str, str], int] = {}
    for d in found.values():
        counts[(d.id, d.sha256)] = counts.get((d.id, d.sha256), 0) + 1
    best = min(counts, key=lambda key: (-counts[key], key))
    return next(d for d in found.values() if (d.id, d.sha256) == best)


# --- one fetch --------------------------------------------------------------------------


class _Fetch:
    """The download of one model: chunks handed to workers, one per stream per peer."""

    def __init__(self, service: FetchService, descriptor: ModelDescriptor, progress: _Progress):
        self._service = service
        self._node = service._node
        self._config = service._node.config.fetch
        self.descriptor = descriptor
        self.progress = progress
        self.manifest: Manifest | None = None
        self._pending: deque[tuple[int, int]] = deque()  # (file, chunk) not yet fetched
        self._in_flight = 0
        self._workers = 0
        self._tried: set[str] = set()
        self._bad: set[str] = set()  # peers that sent a chunk not matching its hash
        self._changed = trio.lowlevel.ParkingLot()
        self._fds: dict[int, int] = {}
        data_dir = self._node.config.data_dir
        self.partial = data_dir / "fetching" / descriptor.id
        self.final = data_dir / "models" / descriptor.id

    @property
    def complete(self) -> bool:
        return self.manifest is not None and not self._pending and not self._in_flight

    async def run(self) -> Path:
        started = trio.current_time()
        self.manifest = await self._first_manifest()
        self._check_limits(self.manifest)
        self.progress.total_bytes = self.manifest.total_bytes
        self.progress.state = "fetching"
        self.partial.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(self._plan, self.manifest)
        try:
            with unwrap_single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._recruit, nursery)
                    await self._until_complete()
                    nursery.cancel_scope.cancel()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self.progress.peers.clear()
        self.progress.download_s = trio.current_time() - started
        self.progress.state = "verifying"
        await trio.to_thread.run_sync(self._finish, self.manifest)
        return self.final

    async def _first_manifest(self) -> Manifest:
        """The manifest of the first announcing peer that gives a valid one: peers this
        node is connected to first, then others as they are announced, for up to
        `find_timeout` (a record may outlive its node)."""
        tried: set[str] = set()
        with trio.move_on_after(self._config.find_timeout):
            while True:
                view = await self._node.view.wait_until(lambda v: bool(self._untried(v, tried)))
                connected = self._node.connected_peers()
                for peer in sorted(
                    self._untried(view, tried), key=lambda p: (p not in connected, p)
                ):
                    tried.add(peer)
                    manifest = await self._manifest_from(peer)
                    if manifest is not None:
                        return manifest
        raise FetchError(
            FetchFailure.NO_PEER,
            f"none of the {len(tried)} peers announcing {self.descriptor.id} gave a valid manifest",
        )

    def _untried(self, view: ViewSnapshot, tried: set[str]) -> set[str]:
        found = announcers(view, self.descriptor.id, None)
        return {p for p, d in found.items() if d.sha256 == self.descriptor.sha256} - tried

    async def _manifest_from(self, peer: str) -> Manifest | None:
        try:
            channel = await self._open(peer)
        except JobError as error:
            logger.info("no manifest of %s from %s: %s", self.descriptor.id, peer, error.message)
            return None
        try:
            return await self._ask_manifest(channel)
        except _PeerFailed as failure:
            logger.info("no manifest of %s from %s: %s", self.descriptor.id, peer, failure)
            return None
        finally:
            await channel.close()

    def _check_limits(self, manifest: Manifest) -> None:
        limit = round(self._config.max_model_mb * MB)
        if manifest.total_bytes > limit:
            raise FetchError(
                FetchFailure.TOO_LARGE,
                f"model {manifest.model_id} is {manifest.total_bytes / MB:.1f} MB, over this "
                f"node's fetch limit of {self._config.max_model_mb:g} MB (--fetch-max-mb)",
            )
        budget = self._node.executor.models.budget_bytes
        if budget is not None and manifest.memory_bytes > budget:
            raise FetchError(
                FetchFailure.OVER_BUDGET,
                f"model {manifest.model_id} needs about {manifest.memory_bytes / MB:.1f} MB, "
                f"more than this node's model memory budget of {budget / MB:g} MB "
                "(--model-memory-mb)",
            )

    def _plan(self, manifest: Manifest) -> None:
        """Open the partial files; queue every chunk not already there (a fetch cut
        short resumes) with the right hash."""
        for i, entry in enumerate(manifest.files):
            path = self.partial / entry.name
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[i] = fd
            if os.fstat(fd).st_size != entry.size:
                os.ftruncate(fd, entry.size)
            for c, expected in enumerate(entry.chunks):
                data = os.pread(fd, manifest.chunk_bytes, c * manifest.chunk_bytes)
                if sha256_hex(data) == expected:
                    self.progress.done_bytes += len(data)
                else:
                    self._pending.append((i, c))

    async def _recruit(self, nursery: trio.Nursery) -> None:
        """Start workers for every announcing peer, as they come."""
        while True:
            view = await self._node.view.wait_until(lambda v: bool(self._new_peers(v)))
            for peer in sorted(self._new_peers(view)):
                self._tried.add(peer)
                for _ in range(self._config.streams_per_peer):
                    self._workers += 1
                    nursery.start_soon(self._work, peer)

    def _new_peers(self, view: ViewSnapshot) -> set[str]:
        return self._untried(view, self._tried)

    async def _until_complete(self) -> None:
        while not self.complete:
            if self._workers:
                await self._changed.park()
                continue
            with trio.move_on_after(self._config.find_timeout):
                while not self._workers:
                    await self._changed.park()
            if not self._workers:
                raise FetchError(
                    FetchFailure.NO_PEER,
                    f"every peer announcing {self.descriptor.id} failed or left with "
                    f"{len(self._pending)} chunks to go; the chunks fetched are kept",
                )

    async def _work(self, peer: str) -> None:
        """Fetch chunks from `peer` on one stream until none is left or the peer fails."""
        self.progress.peers.add(peer)
        channel: Channel | None = None
        failed = True
        try:
            channel = await self._open(peer)
            manifest = await self._ask_manifest(channel)
            if manifest != self.manifest:
                raise _PeerFailed("its manifest is not the one being fetched")
            while (item := await self._next(peer)) is not None:
                try:
                    await self._fetch_chunk(channel, peer, *item)
                except BaseException:
                    self._put_back(item)
                    raise
            failed = False
        except (_PeerFailed, JobError) as error:
            logger.info("fetching %s: dropped %s: %s", self.descriptor.id, peer, error)
        finally:
            self._workers -= 1
            self.progress.peers.discard(peer)
            self._changed.unpark_all()
            if channel is not None:
                await (channel.discard() if failed else channel.close())

    async def _next(self, peer: str) -> tuple[int, int] | None:
        while not self._pending:
            if self.complete or peer in self._bad:
                return None
            await self._changed.park()
        if peer in self._bad:
            return None
        self._in_flight += 1
        return self._pending.popleft()

    def _put_back(self, item: tuple[int, int]) -> None:
        self._in_flight -= 1
        self._pending.appendleft(item)
        self._changed.unpark_all()

    async def _fetch_chunk(self, channel: Channel, peer: str, i: int, c: int) -> None:
        assert self.manifest is not None
        entry = self.manifest.files[i]
        reply = await self._ask(channel, ChunkAsk(entry.sha256, c))
        if not isinstance(reply, bytes):
            raise _PeerFailed(f"answered a chunk request with {type(reply).__name__}")
        if sha256_hex(reply) != entry.chunks[c]:
            self._bad.add(peer)
            self._service.corrupt_chunks += 1
            self._changed.unpark_all()
            logger.warning(
                "fetching %s: %s sent chunk %d of %s that does not match its hash; "
                "fetching it from another peer",
                self.descriptor.id,
                peer,
                c,
                entry.name,
            )
            raise _PeerFailed("sent a corrupted chunk")
        os.pwrite(self._fds[i], reply, c * self.manifest.chunk_bytes)
        self._in_flight -= 1
        self.progress.done_bytes += len(reply)
        self.progress.bytes_from[peer] = self.progress.bytes_from.get(peer, 0) + len(reply)
        self._changed.unpark_all()

    async def _open(self, peer: str) -> Channel:
        timeout = self._config.request_timeout
        stream = await self._node.open_stream(peer, FETCH_PROTOCOL, timeout)
        return Channel(stream, CHUNK_BYTES + MAX_REPLY_OVERHEAD)

    async def _ask_manifest(self, channel: Channel) -> Manifest:
        reply = await self._ask(channel, ManifestAsk(self.descriptor.id, self.descriptor.sha256))
        if not isinstance(reply, Manifest) or reply.model_id != self.descriptor.id:
            raise _PeerFailed(f"answered a manifest request with {_describe(reply)}")
        return reply

    async def _ask(self, channel: Channel, request: FetchRequest) -> Reply:
        try:
            with trio.fail_after(self._config.request_timeout):
                await channel.send(encode_request(request))
                reply = decode_reply(await channel.receive())
        except (trio.TooSlowError, FrameError, FetchWireError, *TRANSPORT_ERRORS) as error:
            raise _PeerFailed(repr(error)) from None
        if isinstance(reply, Refusal):
            raise _PeerFailed(f"refused: {reply.code.name}: {reply.message}")
        return reply

    def _finish(self, manifest: Manifest) -> None:
        """Check every file's hash, then move the model where the node serves it from."""
        for entry in manifest.files:
            size, sha, _ = hash_file(self.partial / entry.name, manifest.chunk_bytes)
            if (size, sha) != (entry.size, entry.sha256):  # its chunks matched: cannot be
                shutil.rmtree(self.partial)
                raise FetchError(FetchFailure.BAD_MODEL, f"{entry.name} failed its hash")
        (self.partial / MANIFEST_FILE).write_text(json.dumps(manifest.to_wire()))
        if self.final.exists():
            shutil.rmtree(self.final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial.rename(self.final)


class _PeerFailed(Exception):
    """A peer did not give what a fetch asked of it: the fetch goes on without it."""


def _describe(reply: Reply) -> str:
    if isinstance(reply, Refusal):
        return f"a refusal: {reply.code.name}: {reply.message}"
    return f"a manifest of {reply.model_id}" if isinstance(reply, Manifest) else "something else"


# --- at start ---------------------------------------------------------------------------


def fetched_cards(data_dir: Path, known: Iterable[str]) -> list[ModelCard]:
    """The models fetched into `data_dir` before, each checked file by file against
    its manifest; one that fails is left out (and logged), never served."""
    root = data_dir / "models"
    if not root.is_dir():
        return []
    skip = set(known)
    cards = []
    for model_dir in sorted(root.iterdir()):
        if model_dir.name in skip or not (model_dir / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = Manifest.from_wire(json.loads((model_dir / MANIFEST_FILE).read_text()))
            for entry in manifest.files:
                size, sha, _ = hash_file(model_dir / entry.name, manifest.chunk_bytes)
                if (size, sha) != (entry.size, entry.sha256):
                    raise FetchWireError(f"{entry.name} does not match its manifest")
            cards.append(read_model_card(model_dir))
        except (OSError, ValueError) as error:
            logger.error("not serving fetched model %s: %s", model_dir, error)
    return cards


# --- for `p2p-node peers` ---------------------------------------------------------------


async def fetch_progress(stream: INetStream, timeout: float = 10.0) -> tuple[Progress, ...]:
    """What the node at the other end of `stream` is fetching. Raises JobError."""
    channel = Channel(stream, 1 << 20)
    try:
        with trio.fail_after(timeout):
            await channel.send(encode_request(ProgressAsk()))
            reply = decode_reply(await channel.receive())
    except (trio.TooSlowError, FrameError, FetchWireError, *TRANSPORT_ERRORS) as error:
        raise JobError(ErrorCode.PEER_UNREACHABLE, f"no fetch progress: {error!r}") from None
    finally:
        await channel.close()
    if not isinstance(reply, tuple):
        raise JobError(ErrorCode.MALFORMED_MESSAGE, f"answered a progress request with {reply!r}")
    return reply


def progress_text(fetches: Iterable[Progress]) -> str:
    lines = []
    for p in fetches:
        size = f"{p.done_bytes / MB:.1f}/{p.total_bytes / MB:.1f} MiB" if p.total_bytes else ""
        peers = f" from {p.peers} peers" if p.peers else ""
        lines.append(f"fetch {p.model_id}: {p.state} {size}{peers}".rstrip())
    return "\n".join(lines)
