"""The GossipSub adapter: publish this node's record, validate and apply everyone else's.

py-libp2p 0.8 defaults that would hurt us, all set explicitly here (see
DESIGN.md): a 120 s heartbeat, adaptive gossip (which can stretch the heartbeat
to a minute), spam protection capped at 10 messages/s per topic, eclipse
protection that wants 3 distinct IPs in a mesh (never true on loopback), and
unsigned test defaults. Records are signed (strict signing) and validated by
`gossip.check_record` before GossipSub forwards them. What py-libp2p's pubsub
would let a peer do to a node is closed in `_libp2p.GuardedPubsub`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub, ValidationCache, ValidationResult
from libp2p.pubsub.rpc_queue import PriorityQueue, RpcQueue
from libp2p.pubsub.validators import signature_validator
from libp2p.tools.anyio_service import background_trio_service

from gossip import (
    MAX_DEPARTED,
    Departure,
    DigestEntry,
    PeerRecord,
    PeerState,
    PeerView,
    PublishPacer,
    RecordError,
    Rejection,
    ViewSnapshot,
    check_record,
    digest_entry,
    encode_record,
    is_entry_newer,
    is_newer,
    is_newer_than_entry,
    publish_interval,
)

from ._config import GossipConfig
from ._libp2p import GuardedGossipSub, GuardedPubsub, _expect, _expect_shape, _expect_uses

logger = logging.getLogger(__name__)


MESHED_AFTER_HEARTBEATS = 3
NEW_LINK_GRACE_S = 10.0  # a new link's first beat may come this much later than the ttl
# A neighbour is reported silent only past ttl + LATE_SLACK x this node's recent
# lateness (how late its own timer woke, the largest lately, halving every ttl).
LATE_SLACK = 4.0
MAX_DIGEST_DEPARTED = 256  # left peers a digest names, most recent first
SPREAD_AFTER_S = 0.5  # revivals a sync brought wait this long for more, then go on together
PUSH_YOUNGER_THAN_S = 10.0  # a record new here by a sync is pushed on if this young
PEER_QUEUE_SIZE = 256  # RPCs waiting to be written to one peer (py-libp2p's: 32)

RecordMaker = Callable[[float, tuple[Departure, ...]], PeerRecord]


@functools.lru_cache(maxsize=1024)
def _parse_peer_id(peer_id: str) -> ID | None:
    try:
        return ID.from_base58(peer_id)
    except Exception:  # not a peer id
        return None


VERIFIED_KEPT = 1024  # messages whose good signature a process keeps (see _signed_by_sender)
_verified: OrderedDict[tuple[object, ...], None] = OrderedDict()


def _signed_by_sender(msg: rpc_pb2.Message) -> bool:
    """Whether `msg` bears its sender's signature (py-libp2p's `signature_validator`).

    Good signatures of the last `VERIFIED_KEPT` messages checked in this process
    are kept, by every field the signature covers or that names its key, so a
    message is checked once however many syncs bring it: to one node, and to
    each node of a process that runs many (see `gossip.decode_record`). A bad
    one is checked every time, as before."""
    key = (msg.from_id, msg.seqno, msg.data, tuple(msg.topicIDs), msg.key, msg.signature)
    if key in _verified:
        _verified.move_to_end(key)
        return True
    if not signature_validator(msg):
        return False
    _verified[key] = None
    if len(_verified) > VERIFIED_KEPT:
        _verified.popitem(last=False)
    return True


def worth_pushing(record: PeerRecord, sender: str, wall_now: float) -> bool:
    """Whether a record new here by a sync is news to the network, to pass into
    GossipSub: the sender's own record (a newcomer's, which it published before
    it had a mesh), or one issued within `PUSH_YOUNGER_THAN_S`. (A record that
    brings back a peer this node had dropped is news too, but it travels by
    syncs: see `Gossip.take_synced`.)

    GossipSub carries a record to every node within seconds of its publication,
    so an older one we lacked is most likely our own gap (a newcomer filling its
    view, records lost on a busy link), which the rest of the network has: each
    such push went to every mesh neighbour, which read it (a few KB) to drop it
    as seen. In a burst of nodes starting these were most of the records moved.
    What the network does lack is still repaired by anti-entropy."""
    return record.peer_id == sender or wall_now - record.issued_at < PUSH_YOUNGER_THAN_S


class Gossip:
    """This node's side of the records topic, and liveness between neighbours.

    Built by `open_gossip`. What costs what, and why records are not sent every
    interval: every record reaches every node, once per mesh neighbour, and in
    py-libp2p each delivery costs a few milliseconds of CPU all told (read,
    check, forward). So a record goes out when something changed (paced to one
    per `interval` on average) and otherwise once per `refresh`. Liveness does
    not ride on records: neighbours beat to each other twice per ttl (see
    _beats), a neighbour silent for ttl (`ttl_factor` x `interval`) is reported
    departed in a record published at once, and every other node drops it on
    that report. A connection that drops is reported the same way, at once. Two
    peers that connect swap the records they hold (`signed_messages`,
    `take_synced`), so a newcomer, or a side of a healed partition, does not
    wait for a refresh.
    """

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
        self.received = 0  # peers' records that passed validation, by GossipSub or a sync
        self._pubsub = pubsub
        self._make_record = make_record
        self._my_id = str(pubsub.my_id)
        self._wake = trio.Event()
        self._dirty = False
        self._silent_until = -float("inf")
        self._departures: dict[str, tuple[Departure, float]] = {}
        self._mine: PeerRecord | None = None  # our last published record
        # The signed GossipSub message of each record in the view (and ours): what a sync sends.
        self._signed: dict[str, rpc_pb2.Message] = {}
        self._heard: dict[str, float] = {}  # neighbour -> when its last beat came (local clock)
        self._beaten: set[str] = set()  # neighbours whose beats came on their live connection
        self._lateness = 0.0  # how late this node's timer woke lately (see tick_forever)
        self.reported = 0  # neighbours reported departed by this node (silent or link lost)
        self.unreported = 0  # links lost before their first beat: not reported
        self.unpushed = 0  # records new here by a sync, not passed into GossipSub (old)
        self.revived_by_sync = 0  # records published since a peer held us departed
        self.refuted = 0  # records published since a peer reported us departed
        self.revivals = 0  # records new here by a sync that brought back a dropped peer
        self._news = trio.Event()  # set when a sync brought revivals (see `next_news`)
        self._news_from: set[str] = set()
        self._digest: tuple[ViewSnapshot, PeerRecord | None, tuple[DigestEntry, ...]] | None = None
        self._held_back: list[tuple[ID, rpc_pb2.Message]] = []  # see push_held_back
        self._beat = trio.Event()  # set, and replaced, once per beat period
        self._started_at = trio.current_time()

    @property
    def garbled(self) -> int:
        """Pubsub streams and messages from peers dropped as unreadable (not records)."""
        return self._pubsub.garbled

    @property
    def ttl(self) -> float:
        """How long a neighbour may go unheard before it is reported departed."""
        return self.config.liveness_ttl

    def changed(self) -> None:
        """Something significant changed: publish soon (at once if the pacer allows).
        Already due to publish, the publisher is not woken again: it sleeps until
        the pacer lets it, whatever changes meanwhile (a generation's start and end
        each woke it for a pass that found nothing to do)."""
        if not self._dirty:
            self._dirty = True
            self._wake.set()

    def connection_lost(self, peer_id: str) -> None:
        """A peer we were connected to is gone: it is suspect here, and we tell the others.

        Only if the link had carried a beat. A connection that drops before its
        first beat (a dial whose upgrade timed out in a start-up burst, the other
        side closing a duplicate) says nothing about the peer; reporting it would
        drop the peer from every view and make it publish again to come back,
        flooding a record twice through a network that is already behind, which
        is how a burst of nodes starting turned into a storm that never settled.
        A peer that is gone drops its other links too, and its record expires.
        """
        self._heard.pop(peer_id, None)
        beaten = peer_id in self._beaten
        self._beaten.discard(peer_id)
        known = self.view.snapshot().peers.get(peer_id)
        if known is None:
            return  # a client, or a peer we never heard from
        if not beaten:
            self.unreported += 1
            logger.debug("link to %s lost before its first beat: not reported", peer_id)
            return
        self.view.suspect(peer_id, trio.current_time())
        self._report_departed(known.record)

    def _report_departed(self, record: PeerRecord) -> None:
        self.reported += 1
        departure = Departure(record.peer_id, record.boot_id, record.seq)
        self._departures[record.peer_id] = (departure, trio.current_time())
        self.changed()

    def _connected_to(self, peer_id: str) -> bool:
        peer = _parse_peer_id(peer_id)
        return peer is not None and bool(self._pubsub.host.get_network().connections.get(peer))

    def silence(self, seconds: float) -> None:
        """Publish nothing and beat to no one for `seconds` (the harness's stall: alive
        but silent). A record goes out as soon as it ends."""
        self._silent_until = trio.current_time() + seconds
        self._dirty = True
        self._wake.set()

    @property
    def silenced_until(self) -> float:
        return self._silent_until

    # --- liveness between neighbours --------------------------------------------------

    def heard_from(self, peer_id: str) -> None:
        """A beat from neighbour `peer_id` arrived (on a stream of a live connection)."""
        self._heard[peer_id] = trio.current_time()
        self._beaten.add(peer_id)

    def linked(self, peer_id: str) -> None:
        """A connection to `peer_id` opened: its link's clock starts, with a grace.

        A link's first beat needs a stream opened and negotiated through both
        peers' loops; in a burst of nodes starting (many in one process, each
        loading its models) that alone can take longer than the ttl, and each
        neighbour so reported would be refuted, republished and flooded again,
        which is more of the load that made it late. A peer that dies drops its
        connection, which is reported at once; only a silent one waits the grace.
        """
        # A beat may have come first (the connection event is queued): keep it.
        self._heard.setdefault(peer_id, trio.current_time() + NEW_LINK_GRACE_S)

    def _hears(self, peer_id: str, now: float) -> bool:
        """Whether our own link to `peer_id` says it is alive: connected, and not
        silent past the ttl (if it beats to us at all)."""
        heard = self._heard.get(peer_id)
        if heard is not None and now - heard > self.ttl:
            return False
        return self._connected_to(peer_id)

    async def next_beat(self) -> None:
        """Wait for the next beat (see `tick_forever`): beat writers wait here rather
        than each on its own timer, which in trio costs far more than an event."""
        await self._beat.wait()

    async def tick_forever(self) -> None:
        """The node's one timer for liveness: every beat period, wake the beat
        writers; at each neighbour's deadline, report it if it beats no more (alive
        but silent past the ttl); at each peer's expiry, drop it from the view.

        Not while this node is itself too slow to tell (as Lifeguard does for
        SWIM): when this loop wakes late by over half an interval, beats were
        likely read late too, so no one is reported for one ttl after. And a
        loop that wakes late by less, but often (a process holding many nodes,
        all busy), reads every beat later by several such delays (the socket,
        the muxer, the stream, each a pass of the loop): the ttl stretches by
        `LATE_SLACK` x the largest lateness of late (halving every ttl), which
        on an idle loop is a few milliseconds.
        """
        period = self.config.beat_period
        woke_late_at = -float("inf")
        wake_at = next_beat = woke_at = trio.current_time()
        while True:
            now = trio.current_time()
            late = max(0.0, now - wake_at)
            self._lateness = max(late, self._lateness * 0.5 ** ((now - woke_at) / self.ttl))
            woke_at = now
            if late > self.config.interval / 2:
                logger.info("event loop %.1f s late: no neighbour reported for now", late)
                woke_late_at = now
            if now >= next_beat:
                self._beat.set()
                self._beat = trio.Event()
                next_beat = now + period
            wake_at = min(next_beat, self._watch_neighbours(now, woke_late_at))
            for peer_id in self.view.expire(now):
                logger.info("peer %s expired: no record within its ttl", peer_id)
            if (expiry := self.view.next_expiry()) is not None:
                wake_at = min(wake_at, expiry)
            wake_at = max(wake_at, now) + 0.001
            await trio.sleep_until(wake_at)

    def _watch_neighbours(self, now: float, woke_late_at: float) -> float:
        """Report each neighbour silent past the ttl; returns when to look next."""
        peers = self.view.snapshot().peers
        look_at = float("inf")
        for peer_id, heard in list(self._heard.items()):
            known = peers.get(peer_id)
            if not self._connected_to(peer_id):
                del self._heard[peer_id]  # connection_lost reports it
            elif known is None or known.state is not PeerState.ALIVE:
                continue  # not in the view (a client, or already reported)
            else:
                # A record it just published is a sign of life too (after a stall,
                # its record may come before its next beat). While this node is
                # silenced it leads no beats, so none are answered: no verdict.
                since = max(heard, known.received_at, woke_late_at, self._silent_until)
                ttl = self.ttl + LATE_SLACK * self._lateness
                if now - since > ttl:
                    logger.info("peer %s silent for %.1f s: departed", peer_id, now - since)
                    self.view.depart(peer_id, known.record.boot_id, known.record.seq)
                    self._report_departed(known.record)
                else:
                    look_at = min(look_at, since + ttl)
        return look_at

    # --- records swapped on connecting ------------------------------------------------

    def signed_messages(self) -> tuple[bytes, ...]:
        """Our record and every alive peer's, as the signed messages they published."""
        return tuple(m.SerializeToString() for m in self._held().values())

    def _held(self) -> dict[str, rpc_pb2.Message]:
        """The signed message of our record and of every alive peer's, by peer id."""
        alive = {p.peer_id for p in self.view.snapshot().alive()} | {self._my_id}
        for peer_id in [p for p in self._signed if p not in alive]:
            del self._signed[peer_id]
        return self._signed

    # --- anti-entropy: digests -----------------------------------------------------------

    def digest(self) -> tuple[DigestEntry, ...]:
        """What records this node holds, one (peer id, boot id, seq, issued at) each:
        ours, every peer's in the view, and the last records of the peers that left
        most recently (so that a peer does not send us again what we dropped)."""
        snapshot = self.view.snapshot()  # a new one whenever records or departures change
        cached = self._digest
        if cached is not None and cached[0] is snapshot and cached[1] is self._mine:
            return cached[2]  # (a spread round syncs with every neighbour at once)
        entries: dict[str, DigestEntry] = {}
        for record in self.view.departed(MAX_DIGEST_DEPARTED):
            entries[record.peer_id] = digest_entry(record)
        for peer_id, known in snapshot.peers.items():
            entries[peer_id] = digest_entry(known.record)
        if self._mine is not None:
            entries[self._my_id] = digest_entry(self._mine)
        digest = tuple(entries.values())
        self._digest = (snapshot, self._mine, digest)
        return digest

    def newer_than(self, digest: Sequence[DigestEntry]) -> tuple[bytes, ...]:
        """The signed messages we hold (ours, alive peers') that a peer whose digest
        this is lacks, or holds an older record of."""
        theirs = {entry[0]: entry for entry in digest}
        out = []
        for peer_id, msg in self._held().items():
            record = self._mine if peer_id == self._my_id else self.view.last_record(peer_id)
            entry = theirs.get(peer_id)
            if record is not None and (entry is None or is_newer_than_entry(record, entry)):
                out.append(msg.SerializeToString())
        return tuple(out)

    def wanted(self, digest: Sequence[DigestEntry]) -> tuple[str, ...]:
        """The peers of which a digest names a newer record than we hold (or any,
        where we hold none); never ourselves."""
        out: dict[str, None] = {}
        for entry in digest:
            peer_id = entry[0]
            if peer_id == self._my_id:
                continue
            held = self.view.last_record(peer_id)
            if held is None or is_entry_newer(entry, held):
                out[peer_id] = None
        return tuple(out)

    def holds_gone(self, sender: str, digest: Sequence[DigestEntry]) -> bool:
        """Whether we hold `sender`'s newest record (as its digest names it) as of a
        peer gone, while `sender` is talking to us: a digest reply then names the
        sender among the records it wants (see `messages_wanted`).

        A neighbour that lost its link to a peer reports it departed, and every
        node that takes the report drops it; the peer refutes on seeing the
        report. But behind a cut link (a partition) the report never reaches it,
        and after the heal nothing would bring it back before its next refresh
        (120 s) if it published nothing meanwhile: its record is the one we
        dropped, and a sync moves only newer records (2 peers of 200 in a
        healed 100/100 cut; the others had reported their own cross links)."""
        if sender in self.view.snapshot().peers:
            return False
        held = self.view.last_record(sender)
        if held is None:
            return False
        own = next((entry for entry in digest if entry[0] == sender), None)
        return own is None or not is_entry_newer(own, held)

    def messages_wanted(self, wants: Sequence[str]) -> tuple[bytes, ...]:
        """The signed messages a digest reply asked for. Our own peer id among them
        says the peer holds our current record as of a peer gone (`holds_gone`):
        we publish a newer one, which brings us back into every view that
        dropped us, as a refutation does."""
        if self._my_id in wants:
            self.revived_by_sync += 1
            logger.info("a peer holds us departed while we are alive: publishing again")
            self.changed()
        return self.messages_of([p for p in wants if p != self._my_id])

    def own_message(self) -> tuple[bytes, ...]:
        """Our latest record as we signed and published it (none before the first).

        A sync sends it with its digest, not only when the reply asks for it: in
        a burst of nodes starting, a first reply (every record the peer holds)
        can take longer than the call's timeout through two busy loops, and the
        newcomer's record, sent only after it, then reached no one but by gossip,
        which it had published before it had a mesh."""
        msg = self._signed.get(self._my_id)
        return () if msg is None else (msg.SerializeToString(),)

    def messages_of(self, peer_ids: Sequence[str]) -> tuple[bytes, ...]:
        """The signed messages we hold of these peers (alive ones, or ours)."""
        held = self._held()
        return tuple(held[p].SerializeToString() for p in dict.fromkeys(peer_ids) if p in held)

    async def take_synced(self, messages: Sequence[bytes], sender: str) -> int:
        """Check and apply records a peer passed on; returns how many were new here.

        Each must be a message signed by the record's own peer on our topic, so
        a peer can pass on others' records but not forge them. Records we
        already hold are skipped without a count: a sync repeats them by design.

        What is news to the network goes on. A newcomer's first record (published
        before it had a mesh) and any record issued lately (see `worth_pushing`)
        are passed into GossipSub as if `sender` had forwarded them there, so they
        reach every node that missed them and do not go back to `sender`. Records
        that bring back peers this node had dropped go on by syncs instead
        (`next_news`): they come in bulk, the far side's records when a partition
        heals, and every node of this side lacks them all. A sync carries them
        in one message to each neighbour that lacks them, where GossipSub would
        flood each one by itself to every node, every node reading it once per
        mesh neighbour: at 200 nodes a heal moved ~170 such floods, most of its
        time.
        """
        fresh: list[tuple[PeerRecord, rpc_pb2.Message, bool]] = []
        now = trio.current_time()
        for data in messages:
            try:
                msg = rpc_pb2.Message.FromString(data)
                if list(msg.topicIDs) != [self.config.topic]:
                    raise RecordError(Rejection.MALFORMED, "not a message of our topic")
                signer = ID(msg.from_id).to_base58()
                held = self._signed.get(signer)
                if signer == self._my_id or (held is not None and held.data == msg.data):
                    continue
                previous = self.view.last_record(signer)
                record = check_record(msg.data, signer, None)
                if previous is not None and not is_newer(record, previous):
                    continue
                if not _signed_by_sender(msg):
                    raise RecordError(Rejection.FORGED, "bad signature")
            except RecordError as error:
                self.rejects[error.reason] += 1
                logger.debug("rejected a record synced by %s: %s", sender, error)
                continue
            except Exception as error:  # not a protobuf, a from_id that is no peer id, ...
                self.rejects[Rejection.MALFORMED] += 1
                logger.debug("rejected a message synced by %s: %r", sender, error)
                continue
            revives = previous is not None and signer not in self.view.snapshot().peers
            if self._take(record, msg, now):
                fresh.append((record, msg, revives))
        forwarder = _parse_peer_id(sender) or self._pubsub.my_id
        wall = time.time()
        just_started = trio.current_time() < self.meshed_at
        for record, msg, revives in fresh:
            if just_started and record.peer_id == sender:
                # A newcomer's own record, and no mesh yet to pass it to: held
                # until there is (`push_held_back`). The rest is old news to the
                # network (a burst of it overflowed py-libp2p's queue per peer).
                self._held_back.append((forwarder, msg))
            elif revives and not just_started:
                self.revivals += 1
                self._news_from.add(sender)
                self._news.set()
            elif just_started or not worth_pushing(record, sender, wall):
                self.unpushed += 1
            else:
                await self._push(forwarder, msg)
        return len(fresh)

    async def next_news(self) -> frozenset[str]:
        """Wait until syncs bring records that revive dropped peers; returns the
        peers that sent them since the last call. The node then syncs with its
        other neighbours, which so take the revivals they lack in one reply
        each, and pass them on the same way."""
        await self._news.wait()
        await trio.sleep(SPREAD_AFTER_S)  # news comes in waves: one round for a wave
        self._news = trio.Event()
        senders, self._news_from = frozenset(self._news_from), set()
        return senders

    async def _push(self, forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:  # GossipSub skips what it has seen, and forwards the rest
            await self._pubsub.push_msg(forwarder, msg)
        except Exception as error:  # checked when taken; a failure here is no reason to stop
            logger.debug("could not pass a synced record to GossipSub: %r", error)

    async def push_held_back(self) -> None:
        """When GossipSub's mesh has had time to form (a few heartbeats after
        start), pass into it the records a sync brought meanwhile that are news
        (a newcomer's own, sent by its peer): its first record went out before it
        had a mesh. A newcomer so reaches every node once, by its neighbours; it
        no longer publishes a second record for that (each start cost two floods
        of a few KB through the whole network, then, in a burst of joins)."""
        await trio.sleep_until(self.meshed_at)
        held, self._held_back = self._held_back, []
        for forwarder, msg in held:
            signer = ID(msg.from_id).to_base58()
            if self._signed.get(signer) is msg:  # still the newest we hold
                await self._push(forwarder, msg)

    # --- validation, receiving, publishing --------------------------------------------

    def validate(self, forwarder: ID, msg: Any) -> bool:
        """GossipSub topic validator: only well-formed, signer-owned, newer records pass.

        A record that passes is taken into the view here, at once: py-libp2p hands
        validated messages to the subscription through a channel of 32 slots and
        drops what does not fit, which a burst of records (nodes joining, a sync
        passed on) overflows. `receive` only drains that channel.
        """
        try:
            signer = ID(msg.from_id).to_base58()
            if signer == self._my_id:
                if forwarder == self._pubsub.my_id:
                    self._signed[self._my_id] = msg  # ours, as peers will check it
                return True  # one of ours coming back: pubsub drops it after this
            held = self._signed.get(signer)
            if held is not None and held.seqno == msg.seqno and held.data == msg.data:
                return True  # the message we took by sync first: pass it on, nothing to check
            record = check_record(msg.data, signer, self.view.last_record(signer))
        except RecordError as error:
            self.rejects[error.reason] += 1
            logger.debug("rejected a record forwarded by %s: %s", forwarder, error)
            return False
        except Exception as error:  # a from_id that is not a peer id, and the like
            self.rejects[Rejection.MALFORMED] += 1
            logger.debug("rejected a message forwarded by %s: %r", forwarder, error)
            return False
        self._take(record, msg, trio.current_time())
        return True

    async def receive(self, subscription: Any) -> None:
        """Drain the subscription (`validate` took every record already)."""
        while True:
            await subscription.get()

    def _take(self, record: PeerRecord, msg: rpc_pb2.Message, now: float) -> bool:
        self.received += 1
        if not self.view.apply(record, now):
            return False
        self._signed[record.peer_id] = msg
        self._departures.pop(record.peer_id, None)
        for gone in record.departed:
            if gone.peer_id == self._my_id:
                self._refute(gone)
            # Our own live link to the peer outweighs a neighbour's word: one
            # dropped link (or one neighbour's flaky view) must not take the peer
            # out of every view. Should the peer be dead, our link says so too.
            elif not self._hears(gone.peer_id, now):
                self.view.depart(gone.peer_id, gone.boot_id, gone.seq)
        return True

    def _refute(self, gone: Departure) -> None:
        """A peer reported us departed: if it was our current record, publish a newer one,
        which brings us back into every view that dropped us."""
        mine = self._mine
        if mine is not None and gone.boot_id == mine.boot_id and gone.seq >= mine.seq:
            logger.info("reported departed by a neighbour while alive: publishing again")
            self.refuted += 1
            self.changed()

    @property
    def meshed_at(self) -> float:
        """When GossipSub's mesh has had time to form (trio's clock): until then a
        record a sync brought is not passed into GossipSub (`take_synced`)."""
        return self._started_at + MESHED_AFTER_HEARTBEATS * self.config.heartbeat_s

    async def publish_forever(self) -> None:
        pacer = PublishPacer()
        last: float | None = None
        refresh = self.config.refresh
        while True:
            now = trio.current_time()
            peers = len(self.view.snapshot())
            interval = publish_interval(peers, self.config.interval, self.config.budget)
            wanted = publish_interval(peers, self.config.refresh, self.config.budget)
            if abs(wanted - refresh) > 0.25 * refresh:
                # Peers expire us by the refresh we announced: tell them it moved.
                self._dirty = True
                refresh = wanted
            silent = now < self._silent_until
            due = last is None or now - last >= refresh
            if self._dirty and pacer.due(now, interval, changed=True):
                due = True
            if due and not silent:
                self._dirty = False
                await self._publish(refresh, now)
                pacer.published(now, interval)
                last = now
            wake_at = (now if last is None else last) + refresh
            if self._dirty:
                wake_at = min(wake_at, pacer.next_due(now, interval, changed=True))
            if silent:
                wake_at = max(wake_at, self._silent_until)
            with trio.move_on_at(wake_at):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _publish(self, refresh: float, now: float) -> None:
        for peer_id, (_, since) in list(self._departures.items()):
            if now - since > self.ttl:
                del self._departures[peer_id]
        departed = tuple(d for d, _ in self._departures.values())[-MAX_DEPARTED:]
        record = self._make_record(refresh, departed)
        self._mine = record
        await self._pubsub.publish(self.config.topic, encode_record(record))
        self.published += 1


class _ValidationCache(ValidationCache):
    """py-libp2p's cache of validation results, least recently used order kept in an
    OrderedDict instead of a list: its list made every put (one per record taken)
    and every hit scan up to 1,000 ids, a top cost of a node when records flow."""

    def __init__(self, ttl: int, max_size: int) -> None:
        super().__init__(ttl, max_size)
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def get(self, msg_id: bytes) -> ValidationResult | None:
        result = self.cache.get(msg_id)
        if result is None:
            return None
        if time.time() - result.timestamp > self.ttl:
            self._remove(msg_id)
            return None
        self._order.move_to_end(msg_id)
        return result

    def put(self, msg_id: bytes, result: ValidationResult) -> None:
        while len(self.cache) >= self.max_size and self._order:
            oldest, _ = self._order.popitem(last=False)
            self.cache.pop(oldest, None)
        self.cache[msg_id] = result
        self._order[msg_id] = None
        self._order.move_to_end(msg_id)

    def _remove(self, msg_id: bytes) -> None:
        self.cache.pop(msg_id, None)
        self._order.pop(msg_id, None)


class _RoomyQueues(dict[ID, RpcQueue]):
    """Pubsub's queue of RPCs to write, per peer, each made to hold `PEER_QUEUE_SIZE`.

    py-libp2p drops an RPC that finds its peer's queue full (32, go-libp2p's
    default). A new peer is sent the recent records at once, and in a burst of
    nodes starting a busy loop writes slower than records come: dropped records
    reached no one beyond, until anti-entropy found them missing, seconds later.
    A record is a few KB: a longer queue costs little memory and loses none."""

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        inner = queue._queue
        inner.max_size = max(inner.max_size, PEER_QUEUE_SIZE)
        super().__setitem__(peer_id, queue)


class _Pubsub(GuardedPubsub):
    """GuardedPubsub, retrying a peer's pubsub stream whose opening timed out.

    py-libp2p opens its pubsub stream to each new peer, retrying while connected,
    but only on a SwarmException: a multistream negotiation that timed out
    (StreamFailure), as when a burst of nodes starting in one process holds
    its loop past the 5 s negotiation timeout, was final. The two peers then
    stayed connected with no pubsub between them, for good: a node whose every
    link failed so heard no record and sent none. Now it is retried like the
    rest; a peer that refuses the protocol is still given up on. Its validation
    cache is `_ValidationCache`, and its queues of RPCs to write to each peer hold
    `PEER_QUEUE_SIZE` (see `_RoomyQueues`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.validation_cache
        self.validation_cache = _ValidationCache(old.ttl, old.max_size)
        self.peer_queues = _RoomyQueues(self.peer_queues)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        try:
            await super()._handle_new_peer(peer_id)
        except StreamFailure as error:
            cause = error.__cause__
            if isinstance(cause, MultiselectClientError) and str(cause).startswith(
                "protocols not supported"
            ):
                raise
            raise SwarmException(f"no pubsub stream to {peer_id} yet: {cause or error}") from error


def _check_retry_shape() -> None:
    _expect_shape("pubsub retry", Pubsub, "_handle_new_peer", "(self, peer_id)", is_async=True)
    _expect_uses("pubsub retry", Pubsub._handle_new_peer_with_retry, "_handle_new_peer")
    _expect_uses("pubsub retry", Pubsub.handle_peer_queue, "_handle_new_peer_with_retry")
    for name in ("get", "put", "_remove", "clear_expired"):
        _expect("validation cache", hasattr(ValidationCache, name), f"no ValidationCache.{name}")
    _expect_uses("validation cache", ValidationCache.clear_expired, "_remove")
    _expect_uses("peer queues", Pubsub._handle_new_peer, "RpcQueue", "peer_queues")
    _expect_uses("peer queues", RpcQueue.__init__, "PriorityQueue", "_queue")
    _expect_uses("peer queues", PriorityQueue.push, "max_size")


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
    # GRAFT flood protection takes a GRAFT from a peer within 10 s of a PRUNE
    # *received from* that peer for a flood, and answers with a PRUNE, which the
    # other side records the same way: two nodes that prune each other once (a
    # mesh over its high degree, as when nodes join in a burst) refuse each
    # other's GRAFTs from then on, and records stop flowing over their link.
    router.graft_flood_threshold = 0.0
    _check_retry_shape()
    pubsub = _Pubsub(host, router, strict_signing=True)
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
                nursery.start_soon(gossip.push_held_back)
                nursery.start_soon(gossip.tick_forever)
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
