"""One model's download from the peers that announce it: the fetching side of
`/p2p-node/fetch/1.0.0` (`_fetch` has the serving side and the node's part).

A fetcher takes the manifest of the first announcing peer that gives a valid
one, refuses a model over its size limit or memory budget, then pulls chunks
from every announcing peer at once (`streams_per_peer` streams each) from one
queue. A chunk whose hash is not the manifest's goes back to the queue and its
peer is dropped; a peer that dies or refuses leaves its chunk to the others.
Chunks land in `<data dir>/fetching/<id>/` (a fetch started again keeps those
that hash right); every file is hashed again before the directory moves to
`<data dir>/models/<id>/` with its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.custom_types import TProtocol

from gossip import ModelDescriptor, ModelEntry, ViewSnapshot
from scheduler import JobError

from ._channel import TRANSPORT_ERRORS, Channel
from ._errors import unwrap_single_errors
from ._framing import FrameError
from ._manifest import (
    CHUNK_BYTES,
    MANIFEST_FILE,
    ChunkAsk,
    FetchRequest,
    FetchWireError,
    Manifest,
    ManifestAsk,
    Progress,
    Refusal,
    Reply,
    decode_reply,
    encode_request,
    hash_file,
    sha256_hex,
)

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

FETCH_PROTOCOL = TProtocol("/p2p-node/fetch/1.0.0")
MAX_REPLY_OVERHEAD = 64 * 1024  # a chunk reply's frame: the chunk plus this
MB = 1 << 20


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
class FetchProgress:
    """One fetch as it goes (`frozen()`: as `p2p-node peers` shows it)."""

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


def announcers(view: ViewSnapshot, model_id: str, stage: int | None) -> dict[str, ModelDescriptor]:
    """Alive peers announcing `model_id` (or stage `stage` of it), with what they announce."""
    found = {}
    for peer in view.alive():
        for entry in peer.record.models:
            if matches(entry, model_id, stage):
                found[peer.record.peer_id] = entry.descriptor
    return found


def matches(entry: ModelEntry, model_id: str, stage: int | None) -> bool:
    """Whether a record's model entry is `model_id`, or stage `stage` of it: an entry
    whose `stage` (a `StageOf`, from issue 16's stage records) names that parent and
    index. An entry with no stage is no stage of anything."""
    if stage is None:
        return entry.descriptor.id == model_id
    of = getattr(entry, "stage", None)
    return of is not None and (of.parent, of.index) == (model_id, stage)


def most_announced(found: dict[str, ModelDescriptor]) -> ModelDescriptor:
    """The (id, sha256) most peers announce (ties: the first by sha256)."""
    counts: dict[tuple[str, str], int] = {}
    for d in found.values():
        counts[(d.id, d.sha256)] = counts.get((d.id, d.sha256), 0) + 1
    best = min(counts, key=lambda key: (-counts[key], key))
    return next(d for d in found.values() if (d.id, d.sha256) == best)


class Download:
    """The download of one model: chunks handed to workers, one per stream per peer."""

    def __init__(
        self,
        node: Node,
        descriptor: ModelDescriptor,
        progress: FetchProgress,
        on_corrupt: Callable[[], None],
    ) -> None:
        self._node = node
        self._config = node.config.fetch
        self._on_corrupt = on_corrupt
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
        short resumes) with the right hash. Files the manifest does not list go."""
        listed = {entry.name for entry in manifest.files}
        for stale in self.partial.iterdir():
            if stale.name not in listed:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
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
        offset, fd = c * self.manifest.chunk_bytes, self._fds[i]
        # Hash and write in a worker thread (hashlib lets go of the GIL), so that the
        # event loop goes on reading the other streams meanwhile.
        if not await trio.to_thread.run_sync(_write_checked, fd, offset, reply, entry.chunks[c]):
            self._bad.add(peer)
            self._on_corrupt()
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
        if reply.model_sha256 != self.descriptor.sha256:  # its model.onnx hashes to this
            raise _PeerFailed("answered with the manifest of another model.onnx")
        return reply

    async def read_files(self, names: Sequence[str], max_bytes: int) -> dict[str, bytes]:
        """Files `names` of the model, into memory (nothing is written), from the first
        announcing peer that gives them all: each chunk checked against that peer's
        manifest (whose model.onnx hashes to the announced sha256), each file against
        its whole hash and `max_bytes`. FetchError(NO_PEER) naming why when none does."""
        view = self._node.view.snapshot()
        connected = self._node.connected_peers()
        peers = sorted(self._untried(view, set()), key=lambda p: (p not in connected, p))
        why: list[str] = []
        for peer in peers:
            try:
                channel = await self._open(peer)
            except JobError as error:
                why.append(f"{peer}: {error.message}")
                continue
            failed = True
            try:
                manifest = await self._ask_manifest(channel)
                files = {
                    name: await self._read_file(channel, manifest, name, max_bytes)
                    for name in names
                }
                failed = False
                return files
            except _PeerFailed as failure:
                logger.info(
                    "reading %s of %s from %s: %s", names, self.descriptor.id, peer, failure
                )
                why.append(f"{peer}: {failure}")
            finally:
                await (channel.discard() if failed else channel.close())
        raise FetchError(
            FetchFailure.NO_PEER,
            f"none of the {len(peers)} peers announcing {self.descriptor.id} gave its "
            f"{', '.join(names)}" + (f" ({'; '.join(why[:3])})" if why else ""),
        )

    async def _read_file(
        self, channel: Channel, manifest: Manifest, name: str, max_bytes: int
    ) -> bytes:
        entry = next((f for f in manifest.files if f.name == name), None)
        if entry is None:
            raise _PeerFailed(f"its manifest lists no {name}")
        if entry.size > max_bytes:
            raise _PeerFailed(f"its {name} is {entry.size:,} bytes, over {max_bytes:,}")
        parts = []
        for c, expected in enumerate(entry.chunks):
            reply = await self._ask(channel, ChunkAsk(entry.sha256, c))
            if not isinstance(reply, bytes) or sha256_hex(reply) != expected:
                self._on_corrupt()
                raise _PeerFailed(f"sent chunk {c} of {name} that does not match its hash")
            parts.append(reply)
        data = b"".join(parts)
        if len(data) != entry.size or sha256_hex(data) != entry.sha256:
            raise _PeerFailed(f"its {name} does not match its hash")
        return data

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


def _write_checked(fd: int, offset: int, data: bytes, sha256: str) -> bool:
    """Write `data` at `offset` if it hashes to `sha256`; whether it did."""
    if sha256_hex(data) != sha256:
        return False
    os.pwrite(fd, data, offset)
    return True


class _PeerFailed(Exception):
    """A peer did not give what a fetch asked of it: the fetch goes on without it."""


def _describe(reply: Reply) -> str:
    if isinstance(reply, Refusal):
        return f"a refusal: {reply.code.name}: {reply.message}"
    return f"a manifest of {reply.model_id}" if isinstance(reply, Manifest) else "something else"
