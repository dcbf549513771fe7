"""Whom a node stays connected to: its bootstrap peers, the peers found on the LAN,
and enough others to hold a degree.

Kept peers are dialed until connected and redialed whenever they drop, with
exponential backoff and jitter between failed dials. They are the bootstrap peers,
and the peers mDNS finds on the LAN (`found`, a channel of (peer id, addresses)):
a found peer is kept as a bootstrap peer is, except that one unreachable for
`FORGET_FOUND_S` since it was last found or connected is forgotten until mDNS
finds it again. Beyond them, records carry listen addresses, so a node with fewer
than `target_degree` connections dials alive peers from its view until it holds
that many.

`kick()` says that something changed (a connection dropped, a block lifted): every
loop looks again at once. No kick is lost: each loop notes the kick count when it
looks at the state, and waits only if no kick came since; a kick unparks every
waiter (a `ParkingLot`, as `Executor` counts). A shared `trio.Event` that waiters
replace loses kicks: a waiter that replaces it strands the others on the old one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import trio

from gossip import PeerView
from scheduler import JobError

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.25
BACKOFF_CAP_S = 10.0
BACKOFF_JITTER = 0.5  # a backoff waits between (1 - this) and 1 times its delay
DEGREE_CHECK_S = 1.0
FORGET_FOUND_S = 120.0  # as long as py-libp2p's mDNS keeps a found peer's addresses
MAX_FOUND = 64  # found peers kept at once: a LAN cannot make a node hold more
MAX_FOUND_ADDRS = 8

Dial = Callable[[str], Awaitable[str]]  # full multiaddr -> peer id; raises JobError
Found = tuple[str, tuple[str, ...]]  # a peer id, and its transport addresses (no /p2p/)

_UNSPECIFIED = ("/ip4/0.0.0.0/", "/ip6/::/")


@dataclass(slots=True)
class _FoundPeer:
    addrs: tuple[str, ...]  # full multiaddrs, ending in /p2p/<peer id>
    seen_at: float  # last found or connected (trio time)


class Membership:
    def __init__(
        self,
        *,
        dial: Dial,
        connected: Callable[[], Collection[str]],
        view: PeerView,
        bootstrap: tuple[str, ...],
        target_degree: int,
        rng: random.Random,
        found: trio.MemoryReceiveChannel[Found] | None = None,
    ) -> None:
        self._dial = dial
        self._connected = connected
        self._view = view
        self._bootstrap = bootstrap
        self._target_degree = target_degree
        self._rng = rng
        self._found_source = found
        self._found: dict[str, _FoundPeer] = {}
        self._blocked: set[str] = set()
        self._kicks = 0
        self._kicked = trio.lowlevel.ParkingLot()

    def kick(self) -> None:
        """Something changed (a connection dropped, a block lifted): look again now."""
        self._kicks += 1
        self._kicked.unpark_all()

    def block(self, peer_ids: Collection[str]) -> None:
        self._blocked |= set(peer_ids)

    def unblock_all(self) -> None:
        self._blocked.clear()
        self.kick()

    @property
    def found_peers(self) -> frozenset[str]:
        """The peers found on the LAN that this node keeps connected."""
        return frozenset(self._found)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for addr in self._bootstrap:
                nursery.start_soon(self._keep_bootstrap_peer, addr)
            if self._target_degree > 0:
                nursery.start_soon(self._hold_degree)
            if self._found_source is not None:
                nursery.start_soon(self._take_found, self._found_source, nursery)

    async def _keep_bootstrap_peer(self, addr: str) -> None:
        await self._keep(_peer_id_of(addr), lambda: (addr,), forget=lambda: False)

    async def _take_found(
        self, source: trio.MemoryReceiveChannel[Found], nursery: trio.Nursery
    ) -> None:
        bootstrap = {_peer_id_of(a) for a in self._bootstrap}
        async for peer_id, addrs in source:
            dialable = tuple(f"{a}/p2p/{peer_id}" for a in addrs if not a.startswith(_UNSPECIFIED))[
                :MAX_FOUND_ADDRS
            ]
            if peer_id in bootstrap or not dialable:
                continue
            known = self._found.get(peer_id)
            if known is None and len(self._found) >= MAX_FOUND:
                logger.info("found peer %s on the LAN; already keeping %d", peer_id, MAX_FOUND)
                continue
            self._found[peer_id] = _FoundPeer(dialable, trio.current_time())
            if known is None:
                logger.info("found peer %s on the LAN at %s", peer_id, list(dialable))
                nursery.start_soon(self._keep_found_peer, peer_id)
            else:
                self.kick()  # its keeper may be backing off from addresses now replaced

    async def _keep_found_peer(self, peer_id: str) -> None:
        def forget() -> bool:
            if trio.current_time() - self._found[peer_id].seen_at < FORGET_FOUND_S:
                return False
            logger.info("found peer %s unreachable for %g s: forgotten", peer_id, FORGET_FOUND_S)
            del self._found[peer_id]
            return True

        await self._keep(peer_id, lambda: self._found[peer_id].addrs, forget)

    async def _keep(
        self, peer_id: str, addrs: Callable[[], Sequence[str]], forget: Callable[[], bool]
    ) -> None:
        """Hold a connection to `peer_id`: dial it while it is not connected (nor
        blocked), backing off after failures, until `forget()` says to stop."""
        delay = BACKOFF_FIRST_S
        while True:
            seen = self._kicks
            if peer_id in self._connected() or peer_id in self._blocked:
                if peer_id in self._found:
                    self._found[peer_id].seen_at = trio.current_time()
                delay = BACKOFF_FIRST_S
                # A dropped connection kicks at once; the timeout is a fallback.
                await self._sleep_or_kick(seen, BACKOFF_CAP_S)
                continue
            failure = await self._dial_any(addrs())
            if failure is None:
                delay = BACKOFF_FIRST_S
                continue
            if forget():
                return
            wait = delay * self._rng.uniform(1 - BACKOFF_JITTER, 1)
            logger.info("peer %s: %s; retrying in %.2g s", peer_id, failure, wait)
            await self._sleep_or_kick(self._kicks, wait)
            delay = min(BACKOFF_CAP_S, delay * 2)

    async def _dial_any(self, addrs: Sequence[str]) -> str | None:
        """Dial the addresses in turn until one connects; None then, else the last error."""
        failure = "no address to dial"
        for addr in addrs:
            try:
                await self._dial(addr)
            except JobError as error:
                failure = error.message
            else:
                logger.info("connected to %s", addr)
                return None
        return failure

    async def _hold_degree(self) -> None:
        while True:
            seen = self._kicks
            connected = set(self._connected())
            # Clients connect too; only peers in the view count towards the degree.
            missing = self._target_degree - len(connected & set(self._view.snapshot().peers))
            if missing > 0:
                candidates = [
                    p
                    for p in self._view.snapshot().alive()
                    if p.peer_id not in connected
                    and p.peer_id not in self._blocked
                    and p.record.addrs
                ]
                for peer in self._rng.sample(candidates, min(missing, len(candidates))):
                    addr = peer.record.addrs[0]
                    try:
                        await self._dial(addr)
                    except JobError as error:
                        logger.debug("could not add peer %s: %s", peer.peer_id, error.message)
            await self._sleep_or_kick(seen, DEGREE_CHECK_S)

    async def _sleep_or_kick(self, seen: int, seconds: float) -> None:
        """Sleep `seconds`, or less if kicked: at once if a kick came after `seen`."""
        if self._kicks != seen:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(seconds):
            await self._kicked.park()


def _peer_id_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[-1]
