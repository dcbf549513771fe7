"""What a node knows about its peers: their latest records, read as immutable snapshots.

A peer is *alive* while its records keep coming; a libp2p disconnect makes it
*suspect* at once (no new work goes to it) until its next record; a peer whose
last record is older than `ttl_factor` x its announced interval is dead and
leaves the view, as does one a neighbour reports departed, and a suspect one
that sends no record within `suspect_ttl`. Time is passed in
(`now`, in the caller's clock: trio.current_time()); the view reads no clock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

import trio

from ._record import PeerRecord, is_newer

logger = logging.getLogger(__name__)

DEFAULT_TTL_FACTOR = 3.0
MAX_TOMBSTONES = 10_000
EVENT_BUFFER = 1024


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"


class EventKind(StrEnum):
    JOINED = "joined"
    UPDATED = "updated"
    SUSPECT = "suspect"
    ALIVE = "alive"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class ViewEvent:
    kind: EventKind
    peer_id: str


@dataclass(frozen=True, slots=True)
class KnownPeer:
    """A peer's latest record, when it arrived (local clock), and its state."""

    record: PeerRecord
    received_at: float
    state: PeerState
    suspect_since: float | None = None  # local clock; set while SUSPECT

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True, slots=True)
class ViewSnapshot:
    """A frozen copy of the view: safe to hold across awaits."""

    peers: Mapping[str, KnownPeer]

    def __len__(self) -> int:
        return len(self.peers)

    def alive(self) -> tuple[KnownPeer, ...]:
        """Peers that may take new work, in peer id order."""
        return tuple(p for _, p in sorted(self.peers.items()) if p.state is PeerState.ALIVE)

    def serving(self, model_id: str) -> tuple[KnownPeer, ...]:
        """Alive peers that announce `model_id`, in peer id order."""
        return tuple(p for p in self.alive() if p.record.serves(model_id))

    def model_ids(self) -> frozenset[str]:
        """Every model some alive peer serves."""
        return frozenset(m.descriptor.id for p in self.alive() for m in p.record.models)


class PeerView:
    """The mutable view, owned by one node. Readers take `snapshot()`."""

    def __init__(
        self, ttl_factor: float = DEFAULT_TTL_FACTOR, suspect_ttl: float | None = None
    ) -> None:
        if not ttl_factor > 0:
            raise ValueError(f"ttl_factor must be > 0, got {ttl_factor}")
        if suspect_ttl is not None and not suspect_ttl > 0:
            raise ValueError(f"suspect_ttl must be > 0, got {suspect_ttl}")
        self.ttl_factor = ttl_factor
        self.suspect_ttl = suspect_ttl
        self._peers: dict[str, KnownPeer] = {}
        # The last record of peers that left: a replay of an older one must not revive them.
        self._tombstones: OrderedDict[str, PeerRecord] = OrderedDict()
        self._snapshot = ViewSnapshot(MappingProxyType({}))
        self._changed = trio.Event()
        self._subscribers: list[trio.MemorySendChannel[ViewEvent]] = []
        self.dropped_events = 0

    # --- reading ------------------------------------------------------------------

    def snapshot(self) -> ViewSnapshot:
        return self._snapshot

    def last_record(self, peer_id: str) -> PeerRecord | None:
        """The newest record accepted from `peer_id`, even if it has since left."""
        known = self._peers.get(peer_id)
        return known.record if known else self._tombstones.get(peer_id)

    def departed(self, limit: int) -> list[PeerRecord]:
        """The last records of the (at most `limit`) peers that left most recently."""
        return list(self._tombstones.values())[-limit:] if limit > 0 else []

    def expires_at(self, known: KnownPeer) -> float:
        at = known.received_at + self.ttl_factor * known.record.interval
        if known.suspect_since is not None and self.suspect_ttl is not None:
            at = min(at, known.suspect_since + self.suspect_ttl)
        return at

    def next_expiry(self) -> float | None:
        """When the next peer will expire if no record comes (for a timer to sleep until)."""
        return min((self.expires_at(p) for p in self._peers.values()), default=None)

    async def wait_until(self, predicate: Callable[[ViewSnapshot], bool]) -> ViewSnapshot:
        """Wait for the first snapshot (maybe the current one) that satisfies `predicate`."""
        while not predicate(self._snapshot):
            await self._changed.wait()
        return self._snapshot

    def subscribe(self) -> trio.MemoryReceiveChannel[ViewEvent]:
        """Change events from now on. A subscriber that falls behind loses events
        (counted in `dropped_events`) rather than slowing the node down."""
        send, receive = trio.open_memory_channel[ViewEvent](EVENT_BUFFER)
        self._subscribers.append(send)
        return receive

    # --- changing -----------------------------------------------------------------

    def apply(self, record: PeerRecord, now: float) -> bool:
        """Take a record if it is newer than what we have; it makes its peer alive."""
        previous = self.last_record(record.peer_id)
        if previous is not None and not is_newer(record, previous):
            return False
        known = self._peers.get(record.peer_id)
        self._tombstones.pop(record.peer_id, None)
        self._peers[record.peer_id] = KnownPeer(record, now, PeerState.ALIVE)
        if known is None:
            kind = EventKind.JOINED
        elif known.state is PeerState.SUSPECT:
            kind = EventKind.ALIVE
        else:
            kind = EventKind.UPDATED
        self._publish(ViewEvent(kind, record.peer_id))
        return True

    def suspect(self, peer_id: str, now: float | None = None) -> None:
        """The connection to `peer_id` dropped: no new work until it is heard from again.
        With `now` and a `suspect_ttl`, it leaves the view if no record comes by then."""
        known = self._peers.get(peer_id)
        if known is not None and known.state is PeerState.ALIVE:
            self._peers[peer_id] = replace(known, state=PeerState.SUSPECT, suspect_since=now)
            self._publish(ViewEvent(EventKind.SUSPECT, peer_id))

    def depart(self, peer_id: str, boot_id: str, seq: int) -> bool:
        """A neighbour saw `peer_id` go after its record (boot_id, seq): drop it if that
        is still its newest. A later record brings it back."""
        known = self._peers.get(peer_id)
        if known is None or known.record.boot_id != boot_id or known.record.seq > seq:
            return False
        self._remove(peer_id)
        return True

    def expire(self, now: float) -> list[str]:
        """Drop every peer silent for longer than its ttl; returns their ids."""
        dead = [p for p, known in self._peers.items() if self.expires_at(known) <= now]
        for peer_id in dead:
            self._remove(peer_id)
        return dead

    def _remove(self, peer_id: str) -> None:
        known = self._peers.pop(peer_id)
        self._tombstones[peer_id] = known.record
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        self._publish(ViewEvent(EventKind.LEFT, peer_id))

    def _publish(self, event: ViewEvent) -> None:
        self._snapshot = ViewSnapshot(MappingProxyType(dict(self._peers)))
        self._changed.set()
        self._changed = trio.Event()
        live = []
        for send in self._subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_events += 1
            except trio.BrokenResourceError:
                continue  # the subscriber closed its end
            live.append(send)
        self._subscribers = live


async def expire_forever(view: PeerView, tick: float) -> None:
    """Drop silent peers as their ttl passes; look at least every `tick` seconds."""
    while True:
        now = trio.current_time()
        next_expiry = view.next_expiry()
        wake_at = now + tick if next_expiry is None else min(now + tick, next_expiry)
        await trio.sleep_until(wake_at)
        for peer_id in view.expire(trio.current_time()):
            logger.info("peer %s expired: no record within its ttl", peer_id)
