"""The node process: identity, host, executor and protocols wired together."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import psutil
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID

from gossip import ModelDescriptor, PeerEntry, PeerView
from scheduler import ErrorCode, JobError

from ._config import NodeConfig, parse_multiaddr, parse_peer_multiaddr
from ._errors import unwrap_single_errors
from ._executor import Executor, load_model
from ._identity import load_or_create_identity, lock_data_dir
from ._repository import bundled_models_dir, read_repository
from ._rpc import (
    INFER_PROTOCOL,
    JOB_PROTOCOL,
    MODELS_PROTOCOL,
    REPLY_GRACE_S,
    Rpc,
    expect_reply,
    new_libp2p_host,
    run_host,
)
from ._wire import ModelsReply, ModelsRequest, Request, RunReply, RunRequest

logger = logging.getLogger(__name__)

_BOOTSTRAP_BACKOFF_S = (0.25, 30.0)  # first retry, cap


class Node:
    """A running node. Get one from `open_node(config)`."""

    def __init__(
        self, config: NodeConfig, rpc: Rpc, executor: Executor, nursery: trio.Nursery
    ) -> None:
        self.config = config
        self.view = PeerView()
        self._rpc = rpc
        self._executor = executor
        self._nursery = nursery

    @property
    def peer_id(self) -> str:
        return self._rpc.peer_id

    @property
    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>."""
        return [str(a) for a in _expand_wildcards(self._rpc.host.get_addrs())]

    @property
    def models(self) -> tuple[ModelDescriptor, ...]:
        return self._executor.descriptors

    @property
    def in_flight(self) -> int:
        """Requests this node is answering right now, on every protocol."""
        return self._rpc.in_flight

    async def connect(self, addr: str) -> str:
        """Dial a peer by its full multiaddr and learn its models; returns its peer id."""
        peer_id = await self._rpc.connect(parse_peer_multiaddr(addr), self.config.dial_timeout)
        await self._learn_models(peer_id)
        return peer_id

    async def run_job(self, request: RunRequest) -> RunReply:
        """Coordinate one job: run it here if this node serves the model, else forward it."""
        with trio.move_on_after(request.timeout_ms / 1000) as scope:
            if self._executor.serves(request.model_id):
                return await self._run_here(request)
            return await self._forward(request)
        assert scope.cancelled_caught
        raise JobError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"job {request.job_id} on model {request.model_id} took over {request.timeout_ms} ms",
            peer=self.peer_id,
        )

    async def _run_here(self, request: RunRequest) -> RunReply:
        execution = await self._executor.run(request.model_id, request.inputs)
        return RunReply(
            job_id=request.job_id,
            model_id=request.model_id,
            outputs=execution.outputs,
            executor=self.peer_id,
            queue_ms=execution.queue_ms,
            compute_ms=execution.compute_ms,
        )

    async def _forward(self, request: RunRequest) -> RunReply:
        """Send the job to the peers that serve its model, in view order, until one answers."""
        candidates = self.view.snapshot().serving(request.model_id)
        if not candidates:
            raise JobError(
                ErrorCode.NO_CAPABLE_PEER,
                f"no known peer serves model {request.model_id!r}; "
                f"served here and by known peers: {sorted(self.served_model_ids())}",
                peer=self.peer_id,
            )
        last_error: JobError | None = None
        for entry in candidates:
            try:
                reply = await self._rpc.call(
                    entry.peer_id,
                    INFER_PROTOCOL,
                    request,
                    timeout=request.timeout_ms / 1000 + REPLY_GRACE_S,
                )
                result: RunReply = expect_reply(reply, RunReply, entry.peer_id)
                return result
            except JobError as error:
                if not error.retryable:
                    raise
                logger.info(
                    "job %s failed on %s, trying the next peer: %s",
                    request.job_id,
                    entry.peer_id,
                    error,
                )
                last_error = error
        assert last_error is not None
        raise last_error

    def served_model_ids(self) -> frozenset[str]:
        local = {m.id for m in self.models}
        return frozenset(local) | self.view.snapshot().model_ids()

    # --- protocol handlers ------------------------------------------------------

    async def _on_job(self, request: Request, sender: str) -> RunReply:
        return await self.run_job(_expect_run(request))

    async def _on_infer(self, request: Request, sender: str) -> RunReply:
        request = _expect_run(request)
        with trio.move_on_after(request.timeout_ms / 1000):
            return await self._run_here(request)
        raise JobError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"model {request.model_id} did not finish within {request.timeout_ms} ms",
            peer=self.peer_id,
        )

    async def _on_models(self, request: Request, sender: str) -> ModelsReply:
        return ModelsReply(self.peer_id, self.models)

    # --- peers ------------------------------------------------------------------

    async def _learn_models(self, peer_id: str) -> None:
        """Ask a peer which models it serves and put the answer in the view."""
        try:
            reply = await self._rpc.call(
                peer_id, MODELS_PROTOCOL, ModelsRequest(), timeout=self.config.models_query_timeout
            )
            models: ModelsReply = expect_reply(reply, ModelsReply, peer_id)
        except JobError as error:
            # Clients and peers of other protocol versions do not answer: not an error.
            logger.debug("peer %s did not list its models: %s", peer_id, error)
            return
        if models.peer_id != peer_id:
            logger.warning("peer %s answered with another peer id %s", peer_id, models.peer_id)
            return
        if not models.models:
            return  # a client, or a node that serves nothing: no work can go there
        addrs = tuple(str(a) for a in self._rpc.host.get_peerstore().addrs(ID.from_base58(peer_id)))
        self.view.update(PeerEntry(peer_id, addrs, models.models))

    async def _track_peers(self, events: trio.MemoryReceiveChannel[tuple[bool, str]]) -> None:
        async with trio.open_nursery() as nursery:
            async for connected, peer_id in events:
                if connected:
                    nursery.start_soon(self._learn_models, peer_id)
                elif not self._rpc.host.get_network().connections.get(ID.from_base58(peer_id)):
                    self.view.remove(peer_id)

    async def _dial_bootstrap(self, addr: str) -> None:
        delay, cap = _BOOTSTRAP_BACKOFF_S
        while True:
            try:
                await self.connect(addr)
                logger.info("connected to bootstrap peer %s", addr)
                return
            except JobError as error:
                logger.warning(
                    "bootstrap peer %s: %s; retrying in %.2g s", addr, error.message, delay
                )
            await trio.sleep(delay)
            delay = min(cap, delay * 2)


def _expect_run(request: Request) -> RunRequest:
    if not isinstance(request, RunRequest):
        raise JobError(ErrorCode.MALFORMED_MESSAGE, "this protocol takes run requests")
    return request


class _ConnectionEvents(INotifee):
    """Forwards libp2p connect/disconnect notifications to the node's peer tracker."""

    def __init__(self, send: trio.MemorySendChannel[tuple[bool, str]]) -> None:
        self._send = send

    def _post(self, connected: bool, conn: INetConn) -> None:
        try:
            self._send.send_nowait((connected, str(conn.muxed_conn.peer_id)))
        except (trio.WouldBlock, trio.ClosedResourceError):
            logger.warning("dropped a connection event: the peer tracker is behind or closed")

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._post(True, conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._post(False, conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Start a node; on exit, answer what was admitted, then close the host."""
    lock = lock_data_dir(config.data_dir)
    try:
        with unwrap_single_errors():
            async with _open_node(config) as node:
                yield node
    finally:
        os.close(lock)


@asynccontextmanager
async def _open_node(config: NodeConfig) -> AsyncIterator[Node]:
    key_pair = load_or_create_identity(config.data_dir)
    cards = read_repository(config.models_dir or bundled_models_dir(), config.serve_models)
    executor = Executor([load_model(c, config.executor) for c in cards], config.executor)
    host = new_libp2p_host(key_pair)
    rpc = Rpc(
        host,
        max_request_bytes=config.max_request_bytes,
        max_reply_bytes=config.max_reply_bytes,
        max_concurrent_inbound=config.max_concurrent_inbound,
    )
    listen = [parse_multiaddr(a) for a in config.listen]
    events_send, events_receive = trio.open_memory_channel[tuple[bool, str]](4096)
    async with run_host(host, listen), trio.open_nursery() as nursery:
        node = Node(config, rpc, executor, nursery)
        rpc.serve(JOB_PROTOCOL, node._on_job)
        rpc.serve(INFER_PROTOCOL, node._on_infer)
        rpc.serve(MODELS_PROTOCOL, node._on_models)
        host.get_network().register_notifee(_ConnectionEvents(events_send))
        nursery.start_soon(node._track_peers, events_receive)
        for addr in config.bootstrap:
            nursery.start_soon(node._dial_bootstrap, addr)
        logger.info(
            "node %s serving %s on %s", node.peer_id, [m.id for m in node.models], node.addrs
        )
        try:
            yield node
        finally:
            with trio.CancelScope(shield=True):
                unanswered = await rpc.drain(config.shutdown_grace)
            if unanswered:
                logger.warning("shut down with %d requests unanswered", unanswered)
            nursery.cancel_scope.cancel()


def _expand_wildcards(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace /ip4/0.0.0.0 with this machine's IPv4 addresses, so peers can dial them."""
    out = []
    for addr in addrs:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            for ip in _local_ipv4_addresses():
                out.append(multiaddr.Multiaddr(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1)))
        else:
            out.append(addr)
    return out


def _local_ipv4_addresses() -> list[str]:
    return sorted(
        {
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET
        },
        key=lambda ip: (not ip.startswith("127."), ip),
    )
