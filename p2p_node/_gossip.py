"""The GossipSub adapter: publish this node's record, validate and apply everyone else's.

py-libp2p 0.8 defaults that would hurt us, all set explicitly here (see
DESIGN.md): a 120 s heartbeat, adaptive gossip (which can stretch the heartbeat
to a minute), spam protection capped at 10 messages/s per topic, eclipse
protection that wants 3 distinct IPs in a mesh (never true on loopback), and
unsigned test defaults. Records are signed (strict signing) and validated by
`gossip.check_record` before GossipSub forwards them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from weakref import WeakKeyDictionary

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from gossip import (
    MAX_DEPARTED,
    Departure,
    PeerRecord,
    PeerView,
    PublishPacer,
    RecordError,
    Rejection,
    check_record,
    decode_record,
    encode_record,
    expire_forever,
    publish_interval,
)

from ._config import GossipConfig

logger = logging.getLogger(__name__)

MAX_VALIDATED_PENDING = 1024  # records validated, not yet taken by receive()


RecordMaker = Callable[[float, tuple[Departure, ...]], PeerRecord]


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, with what a peer sends unable to crash this node.

    Holes in py-libp2p 0.8, closed here:

    - Reading: a frame that is not a protobuf RPC raises DecodeError out of the
      stream handler, and from there out of the host: one garbled message from
      any peer ended the node. Now any error reading a peer's stream resets
      that stream, drops the peer from pubsub (as py-libp2p does for the errors
      it does catch) and is counted in `garbled`.
    - Checking: a published message whose `key` is not a public key raises
      DecodeError from the signature check, in a task whose error stops the
      whole pubsub service. Such a message is now dropped and counted.
    - Writing: GossipSub writes to a peer's stream from more than one task (the
      per-peer sender, and the flushes on identify and on subscribe), and yamux
      sends a message frame by frame as send window allows, so two messages
      could interleave on the wire. The receiver then read a torn RPC. Writes
      to a stream now take turns, and a write that stops part way (timed out
      waiting for window, cancelled) resets the stream, so what follows can
      never be read as the rest of it. (A cancellation in the middle of one
      frame would leave the connection's own framing broken, which no stream
      reset mends; these writes are cancelled only at shutdown.)
    - Forgetting: when pubsub drops a peer it forgot our outbound stream to
      it without closing it, and opened another on the same connection. A
      peer sending one bad frame per stream could leak our streams until its
      connection's stream limit, after which every new stream to it waited
      forever. The stream pubsub forgets is now reset.

    Also, a cost: py-libp2p puts its signed peer record (addresses, signed) in
    every RPC it sends, and the receiver checks its signature and updates the
    peerstore for every RPC it reads, records and control messages alike. Our
    records carry the addresses, signed; these copies are left out. An RPC
    without one is what other libp2p implementations send.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.garbled = 0  # streams dropped and messages refused for the above
        self._warned: set[ID] = set()
        self._write_locks: WeakKeyDictionary[INetStream, trio.Lock] = WeakKeyDictionary()

    async def stream_handler(self, stream: INetStream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception as error:
            peer_id = stream.muxed_conn.peer_id
            if not self.manager.is_running:  # shutting down: not the peer's doing
                logger.debug("pubsub stream from %s ended at shutdown: %r", peer_id, error)
                return
            self._garbled(peer_id, "dropped its pubsub stream", error)
            await _reset_quietly(stream)
            self._handle_dead_peer(peer_id)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        outbound = self.peers.get(peer_id)
        super()._handle_dead_peer(peer_id)
        forgotten = outbound is not None and self.peers.get(peer_id) is not outbound
        if forgotten and self.manager.is_running:
            self.manager.run_task(_reset_quietly, outbound)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as error:
            if msg_forwarder == self.my_id:
                raise  # our own message: its errors are ours to see
            self._garbled(msg_forwarder, "dropped a message it forwarded", error)

    def _garbled(self, peer_id: ID, action: str, error: Exception) -> None:
        """Count it; warn once per peer (a hostile one could send millions)."""
        self.garbled += 1
        level = logging.DEBUG if peer_id in self._warned else logging.WARNING
        if len(self._warned) < 10_000:
            self._warned.add(peer_id)
        # A parse error is the peer's; anything else may be a bug of ours: show where.
        trace = level == logging.WARNING and not isinstance(error, (DecodeError, ValueError))
        logger.log(
            level, "garbled pubsub input from %s, %s: %r", peer_id, action, error, exc_info=trace
        )

    def get_hello_packet(self) -> rpc_pb2.RPC:
        packet = super().get_hello_packet()
        packet.ClearField("senderRecord")
        return packet

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        rpc_msg.ClearField("senderRecord")
        lock = self._write_locks.get(stream)
        if lock is None:  # not setdefault: that would build a lock for every message
            lock = self._write_locks[stream] = trio.Lock()
        async with lock:
            written = False
            try:
                written = await super().write_msg(stream, rpc_msg)
                return written
            finally:
                if not written:  # possibly part of a message on the wire: end the stream
                    with trio.CancelScope(shield=True):
                        await _reset_quietly(stream)
                    peer_id = stream.muxed_conn.peer_id
                    if self.peers.get(peer_id) is stream:  # pubsub opens another
                        self._handle_dead_peer(peer_id)


class GuardedGossipSub(GossipSub):
    """GossipSub that never dials the peers a PRUNE suggests (peer exchange).

    py-libp2p dials them whatever `do_px` says, inline while it reads the
    sender's stream: any peer could make this node dial whom it names, and
    stall its reading meanwhile. Whom a node dials is membership's decision,
    made from signed records.
    """

    async def _do_px(self, px_peers: list[rpc_pb2.PeerInfo]) -> None:
        return


async def _reset_quietly(stream: INetStream) -> None:
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception as error:  # already reset or closed: nothing more to stop
            logger.debug("reset of a pubsub stream failed: %r", error)


class Gossip:
    """This node's side of the records topic. Built by `open_gossip`."""

    def __init__(
        self,
        pubsub: GuardedPubsub,
        view: PeerView,
        config: GossipConfig,
        make_record: RecordMaker,
    ) -> None:
        self.view = view
        self.config = config
        self.rejects: Counter[Rejection] = Counter()
        self.published = 0
        self._pubsub = pubsub
        self._make_record = make_record
        self._my_id = str(pubsub.my_id)
        self._wake = trio.Event()
        self._dirty = False
        self._silent_until = -float("inf")
        self._departures: dict[str, tuple[Departure, float]] = {}
        self._validated: dict[tuple[bytes, bytes], PeerRecord] = {}

    @property
    def garbled(self) -> int:
        """Pubsub streams and messages from peers dropped as unreadable (not records)."""
        return self._pubsub.garbled

    def changed(self) -> None:
        """Something significant changed: publish soon (at once if the pacer allows)."""
        self._dirty = True
        self._wake.set()

    def connection_lost(self, peer_id: str) -> None:
        """A peer we were connected to is gone: it is suspect here, and we tell the others."""
        known = self.view.snapshot().peers.get(peer_id)
        if known is None:
            return  # a client, or a peer we never heard from
        self.view.suspect(peer_id)
        departure = Departure(peer_id, known.record.boot_id, known.record.seq)
        self._departures[peer_id] = (departure, trio.current_time())
        self.changed()

    def _connected_to(self, peer_id: str) -> bool:
        try:
            peer = ID.from_base58(peer_id)
        except Exception:  # not a peer id: no connection to it
            return False
        return bool(self._pubsub.host.get_network().connections.get(peer))

    def silence(self, seconds: float) -> None:
        """Publish nothing for `seconds` (the harness's stall: alive but silent)."""
        self._silent_until = trio.current_time() + seconds

    # --- validation, receiving, publishing, expiry ------------------------------------

    def validate(self, forwarder: ID, msg: Any) -> bool:
        """GossipSub topic validator: only well-formed, signer-owned, newer records pass."""
        try:
            signer = ID(msg.from_id).to_base58()
            record = check_record(msg.data, signer, self.view.last_record(signer))
        except RecordError as error:
            self.rejects[error.reason] += 1
            logger.debug("rejected a record forwarded by %s: %s", forwarder, error)
            return False
        except Exception as error:  # a from_id that is not a peer id, and the like
            self.rejects[Rejection.MALFORMED] += 1
            logger.debug("rejected a message forwarded by %s: %r", forwarder, error)
            return False
        # Decoding a record is ~1 ms of Python: keep it for receive() to use.
        self._validated[(msg.from_id, msg.seqno)] = record
        while len(self._validated) > MAX_VALIDATED_PENDING:
            self._validated.pop(next(iter(self._validated)))
        return True

    async def receive(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            record = self._validated.pop((msg.from_id, msg.seqno), None)
            if record is None:
                try:
                    record = decode_record(msg.data)
                except RecordError:
                    continue
            if record.peer_id == self._my_id:
                continue
            self.view.apply(record, trio.current_time())
            self._departures.pop(record.peer_id, None)
            for gone in record.departed:
                # Our own live connection to the peer outweighs a neighbour's word:
                # one dropped link (or one neighbour's flaky view) must not take
                # the peer out of every view. Should the peer be dead, our
                # connection drops too, or its ttl runs out.
                if gone.peer_id != self._my_id and not self._connected_to(gone.peer_id):
                    self.view.depart(gone.peer_id, gone.boot_id, gone.seq)

    async def publish_forever(self) -> None:
        pacer = PublishPacer()
        announced = self.config.interval
        while True:
            now = trio.current_time()
            interval = publish_interval(
                len(self.view.snapshot()), self.config.interval, self.config.budget
            )
            if abs(interval - announced) > 0.25 * announced:
                # Peers expire us by the interval we announced: tell them it moved.
                self._dirty = True
                announced = interval
            if now >= self._silent_until and pacer.due(now, interval, self._dirty):
                self._dirty = False
                await self._publish(interval, now)
                pacer.published(now, interval)
            wake_at = pacer.next_due(now, interval, self._dirty)
            if now < self._silent_until:
                wake_at = max(wake_at, self._silent_until)
            with trio.move_on_at(wake_at):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _publish(self, interval: float, now: float) -> None:
        ttl = self.view.ttl_factor * interval
        for peer_id, (_, since) in list(self._departures.items()):
            if now - since > ttl:
                del self._departures[peer_id]
        departed = tuple(d for d, _ in self._departures.values())[-MAX_DEPARTED:]
        data = encode_record(self._make_record(interval, departed))
        await self._pubsub.publish(self.config.topic, data)
        self.published += 1


@asynccontextmanager
async def open_gossip(
    host: IHost, view: PeerView, config: GossipConfig, make_record: RecordMaker
) -> AsyncIterator[Gossip]:
    """Join the records topic: validate, receive, publish and expire until exit."""
    router = GuardedGossipSub(
        [PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        heartbeat_interval=config.heartbeat_s,
        heartbeat_initial_delay=0.1,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,  # validation and the record budget bound the rate
        eclipse_protection_enabled=False,
    )
    pubsub = GuardedPubsub(host, router, strict_signing=True)
    # py-libp2p's service shutdown turns an exception passing through it into
    # Cancelled, which an enclosing cancelled scope then absorbs: the body's own
    # error would vanish. Hold it across the shutdown and raise it after.
    raised: list[BaseException] = []
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await pubsub.wait_until_ready()
            gossip = Gossip(pubsub, view, config, make_record)
            pubsub.set_topic_validator(config.topic, gossip.validate, False)
            subscription = await pubsub.subscribe(config.topic)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gossip.receive, subscription)
                nursery.start_soon(gossip.publish_forever)
                nursery.start_soon(expire_forever, view, config.interval)
                try:
                    yield gossip
                except BaseException as error:
                    raised.append(error)
                nursery.cancel_scope.cancel()
    except BaseException:
        if raised:
            raise raised[0] from None
        raise
    if raised:
        raise raised[0]
