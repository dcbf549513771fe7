"""The node process: identity, host, executor, protocols, gossip and membership wired together."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import multiaddr
import numpy as np
import psutil
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction

from gossip import (
    Departure,
    EventKind,
    Load,
    ModelDescriptor,
    ModelEntry,
    PeerRecord,
    PeerView,
    StageOf,
    ViewEvent,
)
from scheduler import (
    DistributedModelOrchestrator,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    NodeIndex,
    NodeInfo,
)
from selection import EnhancedModelOrchestrator, ModelCatalog, PerformanceTracker

from ._admission import Admission
from ._beats import BEAT_PROTOCOL, answer_beats, lead_beats
from ._chain import Chains
from ._channel import MessageLimits
from ._config import MAX_ANNOUNCED_ADDRS, NodeConfig, parse_multiaddr, parse_peer_multiaddr
from ._errors import unwrap_single_errors
from ._executor import Executor, load_model
from ._fetch import FETCH_PROTOCOL, FetchService, fetched_cards
from ._generation import Generations
from ._gossip import Gossip, open_gossip
from ._handlers import serve_node
from ._hardware import CpuMeter, Gpus, capabilities
from ._host import new_libp2p_host, run_host
from ._identity import load_or_create_identity, lock_data_dir
from ._jobs import JobOnce
from ._libp2p import PeerGate
from ._mdns import lan_addrs, run_mdns
from ._membership import Found, Membership
from ._messages import DigestReply, DigestRequest, LoadReply, LoadRequest
from ._metrics import NodeMetrics, node_families, serve_metrics
from ._repository import ModelCard, bundled_models_dir, read_repository
from ._rpc import (
    LOAD_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    PLACE_PROTOCOL,
    SELECT_PROTOCOL,
    SYNC_PROTOCOL,
    Rpc,
    expect_reply,
    open_rpc,
)
from ._serve import Server
from ._stages import (
    ANSWER_BATCH_PROTOCOL,
    ANSWER_PROTOCOL,
    STAGE_BATCH_PROTOCOL,
    STAGE_PROTOCOL,
    serve_answers,
    serve_stage,
)
from ._stream_gen import (
    GENERATE_PIPE_PROTOCOL,
    GENERATE_PROTOCOL,
    GeneratePipes,
    serve_generate,
    serve_generate_pipe,
)
from ._text import TextModel, TextModels
from ._tracker_store import load_tracker, save_periodically, save_tracker

logger = logging.getLogger(__name__)


class Node:
    """A running node. Get one from `open_node(config)`."""

    def __init__(
        self,
        config: NodeConfig,
        rpc: Rpc,
        server: Server,
        executor: Executor,
        gpus: Gpus,
        tracker: PerformanceTracker | None = None,
        gate: PeerGate | None = None,
    ) -> None:
        self.config = config
        self.view = PeerView(config.gossip.ttl_factor, suspect_ttl=config.gossip.liveness_ttl)
        self.boot_id = uuid.uuid4().hex[:16]
        self._rpc = rpc
        self._server = server
        self.generate_pipes = GeneratePipes(rpc)  # kept generate streams to peers
        self._executor = executor
        self._gpus = gpus
        self._capabilities = config.capabilities or capabilities(gpus)
        self._cpu = CpuMeter()
        self._seq = 0
        self._announced_in_flight = 0
        self._in_touch: set[str] = set()  # peers _keep_in_touch runs for
        self.spread_rounds = 0  # rounds of syncs that passed revivals on (see _spread_forever)
        self._gate = gate
        self.admission = Admission(config.admission, rpc.peer_id)
        self._index = NodeIndex(())
        self._index_source: object = None
        self.orchestrator = DistributedModelOrchestrator(
            rpc.peer_id, self.node_index, self.send, self.run_local, self.probe_load
        )
        self._catalog = ModelCatalog(())
        self._catalog_source: object = None
        self.jobs = JobOnce()  # a job sent again (a client failing over) runs once
        self.metrics = NodeMetrics()
        self.metrics_addr: tuple[str, int] | None = None  # where /metrics is served, if it is
        self.selector = EnhancedModelOrchestrator(
            self.orchestrator,
            self.catalog,
            tracker=tracker,
            distribution=config.strategy,
            count_tokens=executor.texts.count_tokens,
            run=lambda request, strategy, hedge: self.chains.run_selected(request, strategy, hedge),
        )
        self.generations: Generations  # set by open_node: text generation sessions
        self.fetches = FetchService(self)  # models shared with peers by content
        self.chains = Chains(self)  # jobs and generations on models served as stages
        # Set by open_node once gossip and membership run.
        self.gossip: Gossip
        self.membership: Membership

    @property
    def server(self) -> Server:
        return self._server

    @property
    def peer_id(self) -> str:
        return self._rpc.peer_id

    @property
    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>."""
        return [str(a) for a in _expand_wildcards(self._rpc.host.get_addrs())]

    @property
    def announced_addrs(self) -> tuple[str, ...]:
        """What this node's record tells peers to dial: `config.announce` when set,
        else its addresses less loopback ones when it has others (a loopback
        address in a remote peer's hands names that peer itself)."""
        if self.config.announce:
            own = f"/p2p/{self.peer_id}"
            return tuple(a + own for a in self.config.announce)
        return tuple(lan_addrs(self.addrs)[:MAX_ANNOUNCED_ADDRS])

    @property
    def models(self) -> tuple[ModelDescriptor, ...]:
        return self._executor.descriptors

    @property
    def executor(self) -> Executor:
        return self._executor

    @property
    def in_flight(self) -> int:
        """Requests this node is answering right now, on every protocol."""
        return self._server.in_flight

    @property
    def running(self) -> int:
        """Requests running on this node's models: ONNX runs holding a worker, and
        generations (a session is one request for as long as it generates)."""
        return self._executor.running + self.generations.sessions

    def connected_peers(self) -> frozenset[str]:
        """Peer ids this node holds a connection to (clients included)."""
        network = self._rpc.host.get_network()
        return frozenset(str(peer) for peer, conns in network.connections.items() if conns)

    async def connect(self, addr: str) -> str:
        """Dial a peer by its full multiaddr; returns its peer id. Its record follows by gossip."""
        return await self._rpc.connect(parse_peer_multiaddr(addr), self.config.dial_timeout)

    async def open_stream(self, peer_id: str, protocol: TProtocol, timeout: float) -> INetStream:
        """A new stream to `peer_id` for a protocol that is not request and reply."""
        return await self._rpc.open_stream(peer_id, protocol, timeout)

    async def disconnect(self, peer_id: str) -> None:
        """Close this node's connections to `peer_id` (either side may dial again)."""
        await self._rpc.host.disconnect(ID.from_base58(peer_id))

    def make_record(self, interval: float, departed: tuple[Departure, ...]) -> PeerRecord:
        """This node's record as of now; gossip calls it at each publish."""
        self._seq += 1
        self._announced_in_flight = self._executor.in_flight
        memory = psutil.virtual_memory()
        return PeerRecord(
            peer_id=self.peer_id,
            boot_id=self.boot_id,
            seq=self._seq,
            issued_at=time.time(),
            interval=interval,
            addrs=self.announced_addrs,
            capabilities=self._capabilities,
            models=tuple(
                ModelEntry(m, self._executor.models.is_loaded(m.id), self._stage_of(m.id))
                for m in self.models
            ),
            load=Load(
                in_flight=self.running,
                queue_length=self._executor.queue_length,
                cpu_percent=self._cpu.percent(),
                memory_available_mb=int(memory.available) // (1 << 20),
                gpu_utilization=self._gpus.utilization(),
            ),
            performance=self._executor.performance(),
            departed=departed,
        )

    async def serve_model(self, card: ModelCard) -> None:
        """Serve a model found after start (one fetched from peers), and announce it.
        ConfigError if it can never fit the memory budget; RepositoryError if it does
        not load."""
        executor = self._executor
        executor.models.check_fits(card)
        model = await trio.to_thread.run_sync(load_model, card, self.config.executor)
        text = TextModel.load(card, model.descriptor)
        executor.models.add(model)
        if text is not None:
            known = (executor.texts.get(i) for i in executor.texts.ids())
            executor.texts = TextModels([*(t for t in known if t is not None), text])
        self.generations.add(card)
        self._catalog_source = self._index_source = None
        self.gossip.changed()

    def _stage_of(self, model_id: str) -> StageOf | None:
        card = self._executor.models.card(model_id)
        if card is None or card.stage is None:
            return None
        return StageOf(card.stage.parent, card.stage.index, card.stage.k)

    def note_load(self) -> None:
        """Publish early when the load moved a lot since the last record."""
        now, then = self._executor.in_flight, self._announced_in_flight
        if abs(now - then) >= max(2, then // 2):
            self.gossip.changed()

    def catalog(self) -> ModelCatalog:
        """Every model the view serves (this node's included), rebuilt when it changes."""
        snapshot = self.view.snapshot()
        if self._catalog_source is not snapshot:
            self._catalog = ModelCatalog.from_records(
                (p.record for p in snapshot.alive()),
                local_peer_id=self.peer_id,
                local_models=self.models,
                local_latency_ms={p.model_id: p.latency_ms for p in self._executor.performance()},
                local_stages={
                    m.id: of for m in self.models if (of := self._stage_of(m.id)) is not None
                },
            )
            self._catalog_source = snapshot
        return self._catalog

    # --- the orchestrator's view of the world ------------------------------------

    def node_index(self) -> NodeIndex:
        """Alive peers plus this node, rebuilt when the view changes."""
        snapshot = self.view.snapshot()
        if self._index_source is not snapshot:
            nodes = [NodeInfo.from_record(p.record, as_of=p.received_at) for p in snapshot.alive()]
            nodes.append(self._self_info())
            self._index, self._index_source = NodeIndex(nodes), snapshot
        return self._index

    def _self_info(self) -> NodeInfo:
        caps = self._capabilities
        return NodeInfo(
            peer_id=self.peer_id,
            models_loaded=self._executor.models.loaded,
            models_on_disk=frozenset(m.id for m in self.models) - self._executor.models.loaded,
            in_flight=self.running,
            queue_length=self._executor.queue_length,
            cpu_count=caps.cpu_count,
            memory_mb=caps.memory_mb,
            memory_available_mb=int(psutil.virtual_memory().available) // (1 << 20),
            gpu_count=len(caps.gpus),
            gpu_memory_mb=sum(g.memory_mb for g in caps.gpus),
            providers=frozenset(caps.providers),
            latency_ms={p.model_id: p.latency_ms for p in self._executor.performance()},
            is_local=True,
            as_of=trio.current_time(),
        )

    async def probe_load(self, peer_id: str, timeout: float) -> int:
        """How many requests `peer_id` (this node included) holds now, running and
        queued: what a coordinator asks its first candidates. Raises JobError."""
        if peer_id == self.peer_id:
            return self._executor.in_flight + self.generations.sessions
        reply = await self._rpc.call(peer_id, LOAD_PROTOCOL, LoadRequest(), timeout)
        answer: LoadReply = expect_reply(reply, LoadReply, peer_id)
        if answer.peer_id != peer_id:
            raise JobError(
                ErrorCode.MALFORMED_MESSAGE,
                f"{peer_id} answered a load probe as {answer.peer_id}",
                peer=peer_id,
            )
        return answer.load

    async def send(
        self, peer_id: str, request: InferenceRequest, timeout: float
    ) -> InferenceResult:
        """Have `peer_id` run `request` (the orchestrator's remote path). Raises JobError.

        A peer the view dropped after the request was placed on it (a load probe
        can come between) is not sent it: the departure abandoned only the calls
        in flight then (`_forget_departed`). The check and the call's start share
        one step, with no checkpoint between, so no departure falls in between.
        """
        if peer_id not in self.view.snapshot().peers:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE,
                "reported departed before the request went",
                peer=peer_id,
            )
        return await self._rpc.infer(peer_id, request, timeout)

    async def run_local(self, request: InferenceRequest) -> InferenceResult:
        """Run `request` on this node's executor (the orchestrator's local path)."""
        if request.model_id in self.generations.model_ids:
            return await self._complete_local(request)
        execution = await self._executor.run(
            request.model_id,
            request.inputs,
            request.outputs,
            texts=request.texts,
            truncate=request.truncate,
        )
        return InferenceResult(
            request.job_id,
            request.model_id,
            execution.outputs,
            self.peer_id,
            execution.queue_ms,
            execution.compute_ms,
            load=self._executor.in_flight,
            labels=execution.labels,
        )

    async def _complete_local(self, request: InferenceRequest) -> InferenceResult:
        """A job for a text generator: each text a prompt, completed greedily."""
        if request.inputs or request.outputs:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {request.model_id} generates text: send it texts (prompts), "
                "not input tensors or output names",
            )
        started = time.perf_counter()
        self.gossip.changed()  # its sessions are load: tell peers, now and after
        try:
            done = await self.generations.complete(request.model_id, request.texts)
        finally:
            self.gossip.changed()
        return InferenceResult(
            request.job_id,
            request.model_id,
            {"tokens": np.array([tokens for _, tokens in done], np.int64)},
            self.peer_id,
            0.0,
            (time.perf_counter() - started) * 1e3,
            load=self._executor.in_flight,
            texts=tuple(text for text, _ in done),
        )

    # --- links to peers -----------------------------------------------------------

    async def _keep_in_touch(self, peer_id: str) -> None:
        """For a new connection to `peer_id`: swap records, and beat while connected.

        The peer that dialed opens both, so each link carries one sync and one
        beat stream, and no node calls a client (clients dial, nodes do not
        dial them). A peer that never took a beat stream and refuses
        one does not speak the protocol: that ends it. A beat stream that ends
        while the connection stays is opened again.
        """
        async with trio.open_nursery() as nursery:
            # Beats start with the sync, not after it: a link cut (or a peer
            # gone silent) while a slow sync is under way is still found out.
            nursery.start_soon(self._sync_with, peer_id)
            await self._beat_with(peer_id)
            nursery.cancel_scope.cancel()

    async def _sync_with(self, peer_id: str) -> None:
        """Swap records now, and once more when GossipSub's mesh has formed: nodes
        that join in a burst publish their first records before they have a mesh,
        and what the first sync passed on went into a mesh still forming; the
        second sync fills the gaps and passes on what is still missing."""
        await self.sync_once(peer_id)
        await trio.sleep(2 * self.config.gossip.heartbeat_s)
        if peer_id in self.connected_peers():
            await self.sync_once(peer_id)

    async def sync_once(self, peer_id: str) -> None:
        """Swap with `peer_id` the records that either lacks, by digests: ours goes
        out with our own record, its reply brings what we lack and names what it
        lacks, which we then send. A record is sent only where it is missing or
        older (ours aside, a few KB), so a sync between two nodes that agree costs
        little more than a digest each way (a record is ~7 KB; a digest entry ~100
        bytes)."""
        timeout = 10 * self.config.gossip.interval
        gossip = self.gossip
        try:
            reply = await self._rpc.call(
                peer_id,
                SYNC_PROTOCOL,
                DigestRequest(gossip.digest(), gossip.own_message()),
                timeout,
            )
            got: DigestReply = expect_reply(reply, DigestReply, peer_id)
            await gossip.take_synced(got.messages, peer_id)
            wanted = gossip.messages_wanted(got.wants)
            if wanted:
                reply = await self._rpc.call(
                    peer_id, SYNC_PROTOCOL, DigestRequest(gossip.digest(), wanted), timeout
                )
                got = expect_reply(reply, DigestReply, peer_id)
                await gossip.take_synced(got.messages, peer_id)
        except JobError as error:  # no verdict on the link: beats decide
            logger.debug("no sync with %s: %s", peer_id, error.message)

    async def _repair_forever(self, rng: random.Random) -> None:
        """Anti-entropy: every `anti_entropy_s` (jittered), sync by digests with one
        connected node, picked at random. A record that GossipSub lost
        on the way (a full queue, a stream that failed to open in a start-up
        burst, a mesh still forming) is then repaired within a few periods,
        instead of at the sender's next refresh (`refresh`, 120 s)."""
        period = self.config.gossip.anti_entropy_s
        while True:
            await trio.sleep(period * rng.uniform(0.5, 1.5))
            # A connected peer we hold a record of, alive or departed (a link back
            # after a partition: the record that reported it reaches it, and it
            # answers with a newer one). Only where there is none (a node whose
            # first syncs failed has an empty view), a peer we dialed. Never a
            # client (no record, and it dialed us): asking one costs it a refusal,
            # and one hanging up mid-negotiation makes py-libp2p log a raw line.
            speaks = self._rpc.speaks
            last_record = self.gossip.view.last_record
            connected = sorted(p for p in self.connected_peers() if speaks(p, SYNC_PROTOCOL))
            candidates = [p for p in connected if last_record(p) is not None] or [
                p for p in connected if p in self._in_touch
            ]
            if candidates:
                await self.sync_once(rng.choice(candidates))

    async def _spread_forever(self) -> None:
        """When syncs bring records that revive peers this node had dropped (the far
        side of a healed partition), sync with every other connected node: each
        takes in one reply the revivals it lacks, and passes them on the same
        way (`Gossip.take_synced`). News that comes during a round makes one
        more round after it."""
        gossip = self.gossip
        while True:
            senders = await gossip.next_news()
            speaks = self._rpc.speaks
            last_record = gossip.view.last_record
            others = [
                p
                for p in sorted(self.connected_peers())
                if p not in senders and speaks(p, SYNC_PROTOCOL) and last_record(p) is not None
            ]
            self.spread_rounds += 1
            async with trio.open_nursery() as nursery:
                for peer_id in others:
                    nursery.start_soon(self.sync_once, peer_id)

    async def _beat_with(self, peer_id: str) -> None:
        period = self.config.gossip.beat_period
        beaten = False
        try:
            while peer_id in self.connected_peers():
                started = trio.current_time()
                try:
                    stream = await self._rpc.open_stream(peer_id, BEAT_PROTOCOL, self.gossip.ttl)
                except JobError as error:
                    # Only a peer that refused the protocol is given up on: a stream
                    # that did not open in time (both loops busy in a start-up
                    # burst, a link cut for a while) is tried again next period.
                    if not beaten and not self._rpc.speaks(peer_id, BEAT_PROTOCOL):
                        logger.debug("no beats with %s: %s", peer_id, error.message)
                        return
                    logger.debug("no beat stream to %s yet: %s", peer_id, error.message)
                else:
                    beaten = True
                    await lead_beats(stream, peer_id, self.gossip)
                await trio.sleep_until(started + period)
        finally:
            self._in_touch.discard(peer_id)

    async def _on_beat_stream(self, stream: INetStream) -> None:
        peer_id = str(stream.muxed_conn.peer_id)
        await answer_beats(stream, peer_id, self.gossip)

    async def _follow_connection_events(
        self, events: trio.MemoryReceiveChannel[tuple[bool, str, bool]], nursery: trio.Nursery
    ) -> None:
        async for connected, peer_id, outbound in events:
            if connected:
                # The link's clock starts now, either side: a link on which no beat
                # ever comes (cut before its first) is reported as a silent one is.
                self.gossip.linked(peer_id)
                if self._gate is not None and not self._gate(peer_id):
                    # Connected while its handshake was under way as the gate closed.
                    await self.disconnect(peer_id)
                elif outbound and peer_id not in self._in_touch:
                    self._in_touch.add(peer_id)
                    nursery.start_soon(self._keep_in_touch, peer_id)
            elif peer_id not in self.connected_peers():
                self._rpc.peer_gone(peer_id)
                self.gossip.connection_lost(peer_id)
                self.membership.kick()

    async def _forget_departed(self, events: trio.MemoryReceiveChannel[ViewEvent]) -> None:
        """For each peer that leaves the view: forget its stats, and fail the requests
        in flight to it, which the orchestrator then places elsewhere under the same
        job id. A frozen peer keeps its connection, so only its departure frees them."""
        async for event in events:
            if event.kind is EventKind.LEFT:
                self.orchestrator.stats.forget(event.peer_id)
                self._rpc.abandon(event.peer_id, "reported departed with the request in flight")


class _ConnectionEvents(INotifee):
    """Forwards libp2p connect/disconnect notifications to the node's peer tracker."""

    def __init__(self, send: trio.MemorySendChannel[tuple[bool, str, bool]]) -> None:
        self._send = send

    def _post(self, connected: bool, conn: INetConn) -> None:
        outbound = getattr(conn, "direction", None) == Direction.OUTBOUND
        try:
            self._send.send_nowait((connected, str(conn.muxed_conn.peer_id), outbound))
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
async def open_node(config: NodeConfig, *, gate: PeerGate | None = None) -> AsyncIterator[Node]:
    """Start a node; on exit, answer what was admitted, then close the host.

    `gate(peer_id)` says whether the node keeps a connection with a peer (default:
    with every peer); a refused peer's connections end as soon as its handshake
    names it, whichever side dials. The harness partitions networks with it.
    """
    lock = lock_data_dir(config.data_dir)
    try:
        with unwrap_single_errors():
            async with _open_node(config, gate) as node:
                yield node
    finally:
        os.close(lock)


@asynccontextmanager
async def _open_node(config: NodeConfig, gate: PeerGate | None) -> AsyncIterator[Node]:
    key_pair = load_or_create_identity(config.data_dir)
    cards = read_repository(config.models_dir or bundled_models_dir(), config.serve_models)
    known = [c.id for c in cards]
    cards += tuple(await trio.to_thread.run_sync(fetched_cards, config.data_dir, known))
    executor = await Executor.load(cards, config.executor)
    tracker = load_tracker(config.data_dir)
    host = new_libp2p_host(key_pair, psk=config.psk, gate=gate)
    limits = MessageLimits(
        max_request_bytes=config.max_request_bytes,
        max_reply_bytes=config.max_reply_bytes,
        request_limits=dict.fromkeys(
            (MODELS_PROTOCOL, PEERS_PROTOCOL, PLACE_PROTOCOL, SELECT_PROTOCOL, LOAD_PROTOCOL),
            config.max_control_request_bytes,
        ),
    )
    server = Server(host, limits, max_concurrent_inbound=config.max_concurrent_inbound)
    listen = [parse_multiaddr(a) for a in config.listen]
    events_send, events_receive = trio.open_memory_channel[tuple[bool, str, bool]](4096)
    found_send, found_receive = trio.open_memory_channel[Found](64)  # peers mDNS finds
    gpus = Gpus()
    try:
        async with (
            run_host(host, listen),
            open_rpc(host, limits) as rpc,
            trio.open_nursery() as nursery,
        ):
            node = Node(config, rpc, server, executor, gpus, tracker, gate)
            node.generations = Generations(executor, cards, config.executor)
            node.chains.nursery = nursery
            serve_node(server, node)
            nursery.start_soon(node.generations.run)
            host.get_network().register_notifee(_ConnectionEvents(events_send))
            async with open_gossip(host, node.view, config.gossip, node.make_record) as gossip:
                node.gossip = gossip
                host.set_stream_handler(BEAT_PROTOCOL, node._on_beat_stream)
                server.serve_stream(GENERATE_PROTOCOL, partial(serve_generate, node))
                host.set_stream_handler(GENERATE_PIPE_PROTOCOL, partial(serve_generate_pipe, node))
                host.set_stream_handler(FETCH_PROTOCOL, node.fetches.serve)
                host.set_stream_handler(STAGE_PROTOCOL, partial(serve_stage, node))
                host.set_stream_handler(
                    STAGE_BATCH_PROTOCOL, partial(serve_stage, node, batch=True)
                )
                host.set_stream_handler(ANSWER_PROTOCOL, partial(serve_answers, node))
                host.set_stream_handler(
                    ANSWER_BATCH_PROTOCOL, partial(serve_answers, node, batch=True)
                )
                executor.models.on_change = gossip.changed  # announce loads and unloads soon
                node.membership = Membership(
                    dial=node.connect,
                    connected=node.connected_peers,
                    view=node.view,
                    bootstrap=config.bootstrap,
                    target_degree=config.target_degree,
                    rng=random.Random(),
                    found=found_receive if config.mdns else None,
                )
                nursery.start_soon(node._follow_connection_events, events_receive, nursery)
                nursery.start_soon(node._forget_departed, node.view.subscribe())
                token = node.orchestrator.activate()
                selector_token = node.selector.activate()
                nursery.start_soon(node.membership.run)
                nursery.start_soon(node._repair_forever, random.Random())
                nursery.start_soon(node._spread_forever)
                if config.mdns:
                    await nursery.start(run_mdns, host, node.addrs, found_send)
                if config.fetch.models:
                    nursery.start_soon(node.fetches.fetch_all, config.fetch.models)
                nursery.start_soon(
                    save_periodically, config.data_dir, tracker, config.tracker_save_interval
                )
                node.metrics.add_source(partial(node_families, node, rpc.traffic, server.traffic))
                if config.metrics_listen is not None:
                    node.metrics_addr = await nursery.start(
                        serve_metrics, node.metrics, *config.metrics_listen
                    )
                logger.info(
                    "node %s serving %s on %s%s",
                    node.peer_id,
                    [m.id for m in node.models],
                    node.addrs,
                    f" in private network {config.psk.fingerprint}" if config.psk else "",
                )
                try:
                    yield node
                finally:
                    node.selector.deactivate(selector_token)
                    node.orchestrator.deactivate(token)
                    with trio.CancelScope(shield=True):
                        unanswered = await server.drain(config.shutdown_grace)
                    if unanswered:
                        logger.warning("shut down with %d requests unanswered", unanswered)
                    nursery.cancel_scope.cancel()
                    save_tracker(config.data_dir, tracker.to_bytes())
    finally:
        gpus.close()


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
