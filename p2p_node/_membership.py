"""Whom a node stays connected to: its bootstrap peers, and enough others to hold a degree.

Bootstrap peers that drop are redialed with exponential backoff. Beyond them,
records carry listen addresses, so a node with fewer than `target_degree`
connections dials alive peers from its view until it holds that many.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection

import trio

from gossip import PeerView
from scheduler import JobError

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.25
BACKOFF_CAP_S = 10.0
DEGREE_CHECK_S = 1.0

Dial = Callable[[str], Awaitable[str]]  # full multiaddr -> peer id; raises JobError


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
    ) -> None:
        self._dial = dial
        self._connected = connected
        self._view = view
        self._bootstrap = bootstrap
        self._target_degree = target_degree
        self._rng = rng
        self._blocked: set[str] = set()
        self._wake = trio.Event()

    def kick(self) -> None:
        """Something changed (a connection dropped, a block lifted): look again now."""
        self._wake.set()

    def block(self, peer_ids: Collection[str]) -> None:
        self._blocked |= set(peer_ids)

    def unblock_all(self) -> None:
        self._blocked.clear()
        self.kick()

    def is_blocked(self, peer_id: str) -> bool:
        return peer_id in self._blocked

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for addr in self._bootstrap:
                nursery.start_soon(self._keep_bootstrap_peer, addr)
            if self._target_degree > 0:
                nursery.start_soon(self._hold_degree)

    async def _keep_bootstrap_peer(self, addr: str) -> None:
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        delay = BACKOFF_FIRST_S
        while True:
            if peer_id in self._connected() or peer_id in self._blocked:
                delay = BACKOFF_FIRST_S
                # A dropped connection kicks us at once; the timeout is a fallback.
                await self._sleep_or_kick(BACKOFF_CAP_S)
                continue
            try:
                await self._dial(addr)
                logger.info("connected to bootstrap peer %s", addr)
                delay = BACKOFF_FIRST_S
            except JobError as error:
                logger.info("bootstrap peer %s: %s; retrying in %.2g s", addr, error.message, delay)
                await self._sleep_or_kick(delay)
                delay = min(BACKOFF_CAP_S, delay * 2)

    async def _hold_degree(self) -> None:
        while True:
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
            await self._sleep_or_kick(DEGREE_CHECK_S)

    async def _sleep_or_kick(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = trio.Event()
