"""The generate protocol: one `GenerateRequest` on a stream, answered by a stream of
`GeneratedPiece` frames and one `GenerateSummary` (or an `ErrorReply`) before the
node closes it.

A node that gets a request it may place (`forward`) is its coordinator: it
selects a model for a task, ranks the peers serving the model with the
orchestrator's placement strategy, and runs the generation on the first that
takes it, itself without a network hop or another peer through a stream of its
own whose frames it relays. A peer that refuses (overloaded, unreachable, shut
down) before its first token is passed over for the next; after it, its error
ends the generation.

Hanging up is how a client stops a generation: a stream reset, or closed, while
the generation runs cancels it on every node it passed through, and the
executing node's session ends and frees its cache at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from scheduler import ErrorCode, JobError

from . import _codec
from ._channel import TRANSPORT_ERRORS, Channel
from ._decoder import Sampling
from ._errors import unwrap_single_errors
from ._framing import FrameError
from ._messages import (
    ErrorReply,
    GeneratedPiece,
    GenerateRequest,
    GenerateSummary,
    Reply,
    WireError,
)

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

GENERATE_PROTOCOL = TProtocol("/p2p-node/generate/1.0.0")
REQUEST_WAIT_S = 10.0  # for the request, once a stream is open
MAX_CANDIDATES = 4  # peers tried for one generation before its first token

Send = Callable[[bytes], Awaitable[None]]


class _HungUp(Exception):
    """The other end of a stream left (or spoke out of turn) while we answered it."""


# --- serving ----------------------------------------------------------------------------


async def serve_generate(node: Node, stream: INetStream) -> None:
    """Answer one generate request on `stream`, then close it (reset it if the caller
    hung up or broke the protocol)."""
    peer = str(stream.muxed_conn.peer_id)
    channel = Channel(stream, node.config.max_request_bytes)
    try:
        with trio.fail_after(REQUEST_WAIT_S):
            payload = await channel.receive()
        with unwrap_single_errors():
            async with _until_hang_up(channel):
                await _answer(node, payload, peer, channel)
    except (_HungUp, trio.TooSlowError, FrameError, *TRANSPORT_ERRORS) as error:
        logger.debug("generate stream from %s ended: %r", peer, error)
        await channel.discard()
    else:
        await channel.close()


async def _answer(node: Node, payload: bytes, peer: str, channel: Channel) -> None:
    started = time.perf_counter()
    try:
        request = _codec.decode_request(payload)
        if not isinstance(request, GenerateRequest):
            raise WireError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{GENERATE_PROTOCOL} takes GenerateRequest, not {type(request).__name__}",
            )
        with trio.move_on_after(request.timeout_ms / 1000) as timer:
            if request.forward:
                node.admission.admit_job(peer, trio.current_time())
                await coordinate(node, request, channel.send)
            else:
                await _admit_placed(node, peer)
                await run_here(node, request, channel.send, started)
        if timer.cancelled_caught:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"generation {request.job_id} did not finish within {request.timeout_ms} ms",
            )
    except JobError as error:
        await channel.send(_codec.encode(ErrorReply.from_error(error, node.peer_id)))
    except TRANSPORT_ERRORS:
        raise  # the stream is gone: nothing to answer on
    except Exception:  # a bug: the caller still gets an answer, the node goes on
        logger.exception("generation for %s failed", peer)
        reply = ErrorReply(ErrorCode.INTERNAL, "internal error; see the node's log", node.peer_id)
        await channel.send(_codec.encode(reply))


async def _admit_placed(node: Node, sender: str) -> None:
    """A generation placed here: from a peer of the network, or an allowed client."""
    if sender in node.view.snapshot().peers or node.admission.allows(sender):
        return
    with trio.move_on_after(node.config.gossip.liveness_ttl):  # its record may be on its way
        await node.view.wait_until(lambda view: sender in view.peers)
        return
    raise node.admission.unauthorized(sender, "run generations")


async def run_here(node: Node, request: GenerateRequest, send: Send, started: float) -> None:
    """Run `request` on this node's generations, sending each piece, then the summary."""
    sampling = Sampling(request.temperature, request.top_k, request.top_p, request.seed)
    ttft_ms = None
    try:
        async with node.generations.open_session(
            request.model_id, request.prompt, request.max_tokens, sampling
        ) as generation:
            # What was made while the last frame went out goes in one frame.
            while pieces := await generation.next_pieces():
                tokens = tuple(p.token for p in pieces)
                text = "".join(p.text for p in pieces)
                await send(_codec.encode(GeneratedPiece(tokens, text)))
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1e3
                    # A session is load while it runs: tell peers (after the first
                    # frame, which the record's signing and sending would delay), and
                    # again when it ends.
                    node.gossip.changed()
            total_ms = (time.perf_counter() - started) * 1e3
            summary = GenerateSummary(
                request.job_id,
                request.model_id,
                generation.text,
                generation.tokens,
                generation.finish,
                node.peer_id,
                total_ms if ttft_ms is None else ttft_ms,
                total_ms,
            )
    finally:
        node.gossip.changed()
    await send(_codec.encode(summary))


async def coordinate(node: Node, request: GenerateRequest, send: Send) -> None:
    """Choose the model and the peer for `request`, and have it run there."""
    model_id = request.model_id
    if request.task is not None:
        chosen = node.selector.rank_models(
            request.task, request.selection or node.config.selection, request.context
        )
        model_id = chosen.best
    if node.chains.prefers_chain(model_id):  # served as stages: see p2p_node/_chain.py
        chained = replace(request, model_id=model_id, task=None, selection=None, context={})
        await node.chains.serve_generation(chained, send)
        return
    strategy = request.strategy or node.config.strategy
    placement = node.orchestrator.placement(model_id, strategy)
    if not placement.candidates:
        reasons = "; ".join(f"{e.peer_id}: {e.reason}" for e in placement.excluded[:4])
        raise JobError(
            ErrorCode.NO_CAPABLE_PEER,
            f"no peer generates with model {model_id}" + (f" ({reasons})" if reasons else ""),
        )
    placed = replace(
        request, model_id=model_id, task=None, selection=None, context={}, forward=False
    )
    deadline = trio.current_time() + request.timeout_ms / 1000
    error: JobError | None = None
    for candidate in placement.candidates[:MAX_CANDIDATES]:
        left_ms = max(1, round((deadline - trio.current_time()) * 1000))
        attempt = replace(placed, timeout_ms=left_ms)
        tried = _Relay(send)
        try:
            if candidate.peer_id == node.peer_id:
                await run_here(node, attempt, tried.send, time.perf_counter())
            else:
                await _run_on_peer(node, candidate.peer_id, attempt, tried)
            return
        except JobError as failure:
            if tried.pieces or not failure.code.retryable:
                raise
            logger.info("generation %s: %s; trying the next peer", request.job_id, failure)
            error = failure
    assert error is not None
    raise error


class _Relay:
    """Passes frames on to the client, counting the pieces among them."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.pieces = 0

    async def send(self, frame: bytes) -> None:
        self.pieces += 1
        await self._send(frame)


async def _run_on_peer(node: Node, peer_id: str, request: GenerateRequest, relay: _Relay) -> None:
    """Relay the frames `peer_id` answers `request` with; its error is raised."""
    stream = await node.open_stream(peer_id, GENERATE_PROTOCOL, node.config.dial_timeout)
    channel = Channel(stream, node.config.max_reply_bytes)
    done = False
    try:
        await channel.send(_codec.encode(request))
        while True:
            frame = await channel.receive()
            reply = _read_reply(frame, peer_id)
            if isinstance(reply, ErrorReply):
                raise reply.to_error()
            done = isinstance(reply, GenerateSummary)
            await relay.send(frame)
            if done:
                return
    except (FrameError, *TRANSPORT_ERRORS) as error:
        raise JobError(
            ErrorCode.PEER_UNREACHABLE, f"generate stream broke: {error!r}", peer=peer_id
        ) from None
    finally:
        await (channel.close() if done else channel.discard())


def _read_reply(frame: bytes, peer_id: str) -> Reply:
    try:
        reply = _codec.decode_reply(frame)
    except WireError as error:
        raise JobError(error.code, f"bad generate frame: {error.message}", peer=peer_id) from None
    if not isinstance(reply, GeneratedPiece | GenerateSummary | ErrorReply):
        raise JobError(
            ErrorCode.MALFORMED_MESSAGE,
            f"expected a generate frame, got a {type(reply).__name__}",
            peer=peer_id,
        )
    return reply


@asynccontextmanager
async def _until_hang_up(channel: Channel) -> AsyncIterator[None]:
    """Run the body while reading `channel`: anything read (the caller may send
    nothing more), or its end, cancels the body and raises _HungUp."""
    hung_up = False

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal hung_up
        try:
            await channel.fill()
        except (FrameError, *TRANSPORT_ERRORS):
            pass
        hung_up = True
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        yield
        nursery.cancel_scope.cancel()
    if hung_up:
        raise _HungUp("the caller hung up")


# --- calling ----------------------------------------------------------------------------


class GenerationStream:
    """A generation's frames, as a caller reads them from the node it asked.

    Iterate for the text pieces as they come; `summary` holds the end (with this
    caller's own time to first token and total time), `tokens` the token ids and
    `pieces` their texts.
    Leaving `open_generation`'s context before the end hangs up: the generation
    stops wherever it runs, and its cache is freed.
    """

    def __init__(self, channel: Channel, peer_id: str, started: float) -> None:
        self._channel = channel
        self._peer_id = peer_id
        self._started = started
        self._first: float | None = None
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.summary: GenerateSummary | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        piece = await self.next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece.text

    async def next_piece(self) -> GeneratedPiece | None:
        """The next piece, or None after the summary. Raises JobError."""
        if self.summary is not None:
            return None
        try:
            frame = await self._channel.receive()
        except (FrameError, *TRANSPORT_ERRORS) as error:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE,
                f"generate stream broke: {error!r}",
                peer=self._peer_id,
            ) from None
        reply = _read_reply(frame, self._peer_id)
        now = time.perf_counter()
        if isinstance(reply, ErrorReply):
            raise reply.to_error()
        if isinstance(reply, GenerateSummary):
            first = self._first if self._first is not None else now
            self.summary = replace(
                reply,
                ttft_ms=(first - self._started) * 1e3,
                total_ms=(now - self._started) * 1e3,
            )
            return None
        assert isinstance(reply, GeneratedPiece)
        if self._first is None:
            self._first = now
        self.tokens.extend(reply.tokens)
        self.pieces.append(reply.text)
        return reply

    async def text(self) -> str:
        """Read to the end; the whole generated text."""
        async for _ in self:
            pass
        assert self.summary is not None
        return self.summary.text


@asynccontextmanager
async def open_generation(
    open_stream: Callable[[], Awaitable[INetStream]],
    peer_id: str,
    request: GenerateRequest,
    max_reply_bytes: int,
) -> AsyncIterator[GenerationStream]:
    """Send `request` on a new stream; yields its frames. Raises JobError."""
    started = time.perf_counter()
    stream = await open_stream()
    channel = Channel(stream, max_reply_bytes)
    generation = GenerationStream(channel, peer_id, started)
    try:
        try:
            await channel.send(_codec.encode(request))
        except TRANSPORT_ERRORS as error:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"generate stream broke: {error!r}", peer=peer_id
            ) from None
        yield generation
    finally:
        await (channel.close() if generation.summary is not None else channel.discard())
