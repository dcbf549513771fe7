"""Models shared by content: the fetch protocol's serving side, and the node's part.

`/p2p-node/fetch/1.0.0` carries requests and replies in turn on one stream
(varint frames, `_manifest`'s messages): a manifest by (model id, sha256 of
its model.onnx as records announce it), a chunk by (file sha256, index), or
the fetches in progress. A node answers only for the models it announces; a
chunk is read from disk and checked against its hash before it goes out.

A node told to `--fetch` a model waits for peers announcing it, downloads it
(`_download`), then serves and announces it; a node loads the models fetched
before at start, after checking every file against its manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream

from scheduler import ErrorCode, JobError

from ._channel import TRANSPORT_ERRORS, Channel
from ._config import ConfigError, parse_fetch_target
from ._download import FETCH_PROTOCOL as FETCH_PROTOCOL
from ._download import (
    Download,
    FetchError,
    FetchFailure,
    FetchProgress,
    announcers,
    most_announced,
)
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
    check_file_name,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    hash_file,
    sha256_hex,
)
from ._repository import ModelCard, RepositoryError, read_model_card

if TYPE_CHECKING:
    from ._client import Client
    from ._node import Node

logger = logging.getLogger(__name__)

IDLE_S = 60.0  # a fetch stream with no request for this long is closed
MB = 1 << 20

Tamper = Callable[[str, int, bytes], bytes]  # (file sha256, chunk index, data) -> sent


# --- serving ----------------------------------------------------------------------------


class FetchService:
    """One node's side of the fetch protocol: it answers peers, and fetches for itself."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._manifests: dict[str, Manifest] = {}  # by model id, for served models
        self._files: dict[str, tuple[Path, FileEntry, int]] = {}  # by sha256: path, entry, chunk
        self._building = trio.Lock()
        self.progress: dict[str, FetchProgress] = {}  # by what --fetch named
        self.tamper: Tamper | None = None  # tests: change a chunk after it was checked
        self.refused: dict[ErrorCode, int] = {}
        self.corrupt_chunks = 0  # chunks from peers that did not match their hash
        self.served_chunks = 0  # chunks this node sent to peers
        self._ended: set[str] = set()  # targets of fetch_all, once they end
        self._ending = trio.lowlevel.ParkingLot()
        self._locks: dict[str, trio.Lock] = {}  # by model id: its download

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

    def _lock(self, model_id: str) -> trio.Lock:
        return self._locks.setdefault(model_id, trio.Lock())

    def count_corrupt(self) -> None:
        self.corrupt_chunks += 1

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
        progress = self.progress[target] = FetchProgress(target)
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
        descriptor = most_announced(found)
        progress.model_id = descriptor.id
        try:  # the id names a directory here: a peer's record must not name another
            check_file_name(descriptor.id)
        except FetchWireError:
            raise FetchError(
                FetchFailure.BAD_MODEL, f"{descriptor.id!r} cannot name a model directory"
            ) from None
        async with self._lock(descriptor.id):  # one download of a model at a time
            if node.executor.serves(descriptor.id):
                progress.state = "done"
                return descriptor.id
            model_dir = await Download(node, descriptor, progress, self.count_corrupt).run()
            try:
                await node.serve_model(read_model_card(model_dir))
            except (RepositoryError, ConfigError) as error:
                shutil.rmtree(model_dir, ignore_errors=True)
                failure = (
                    FetchFailure.OVER_BUDGET
                    if isinstance(error, ConfigError)
                    else FetchFailure.BAD_MODEL
                )
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


async def node_fetches(client: Client) -> tuple[Progress, ...]:
    """What the node `client` is connected to is fetching; () from one that does not say."""
    try:
        return await fetch_progress(await client.open_stream(FETCH_PROTOCOL))
    except JobError:
        return ()


def progress_json(fetches: Iterable[Progress]) -> list[dict[str, object]]:
    return [
        {
            "model_id": p.model_id,
            "state": p.state,
            "done_bytes": p.done_bytes,
            "total_bytes": p.total_bytes,
            "peers": p.peers,
        }
        for p in fetches
    ]


def progress_text(fetches: Iterable[Progress]) -> str:
    lines = []
    for p in fetches:
        size = f"{p.done_bytes / MB:.1f}/{p.total_bytes / MB:.1f} MiB" if p.total_bytes else ""
        peers = f" from {p.peers} peers" if p.peers else ""
        lines.append(f"fetch {p.model_id}: {p.state} {size}{peers}".rstrip())
    return "\n".join(lines)
