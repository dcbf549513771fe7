"""Beats: one byte each way every beat period on one stream per link, so that
neighbours know each other alive. Gossip reports a neighbour that goes silent.

A raw stream, not a request and reply: a beat is the cheapest thing a link can
carry (one yamux frame, one Noise message), and nodes beat to each other all
the time. The side that dialed leads: it writes a beat every period. The other
side answers each beat with one. So each side hears the other once a period,
and no link has a timer of its own: the node's one timer wakes every leader
(`Gossip.next_beat`). A node that is silenced (the harness's stall) neither
leads nor answers; hearing no answers then, it reports no one for the while
(see `Gossip.tick_forever`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ._channel import SEND_TIMEOUT_S
from ._gossip import Gossip
from ._libp2p import reset_quietly

logger = logging.getLogger(__name__)

BEAT_PROTOCOL = TProtocol("/p2p-node/beat/1.0.0")
BEAT = b"\x01"
READ_BYTES = 64  # a peer that sends more than a byte a beat gains nothing by it


async def lead_beats(stream: INetStream, peer_id: str, gossip: Gossip) -> None:
    """The dialer's side, until the stream ends: write a beat at every beat of
    `gossip`, and tell it of every answer read from `peer_id`."""

    async def write_beats() -> None:
        while True:
            if trio.current_time() >= gossip.silenced_until:
                await _write_beat(stream)
            await gossip.next_beat()

    async with _until_the_link_ends(stream, peer_id), trio.open_nursery() as nursery:
        nursery.start_soon(write_beats)
        while await stream.read(READ_BYTES):
            gossip.heard_from(peer_id)
        nursery.cancel_scope.cancel()  # the peer closed its side


async def answer_beats(stream: INetStream, peer_id: str, gossip: Gossip) -> None:
    """The dialed side, until the stream ends: tell `gossip` of every beat read from
    `peer_id` and answer it, at most twice a beat period (a peer that writes
    faster gets no more answers)."""
    least_gap = gossip.config.beat_period / 2
    answered = -float("inf")
    async with _until_the_link_ends(stream, peer_id):
        while await stream.read(READ_BYTES):
            gossip.heard_from(peer_id)
            now = trio.current_time()
            if now >= gossip.silenced_until and now - answered >= least_gap:
                answered = now
                await _write_beat(stream)


async def _write_beat(stream: INetStream) -> None:
    # Shielded: a write cut halfway would break the connection's framing.
    with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT_S):
        await stream.write(BEAT)


@asynccontextmanager
async def _until_the_link_ends(stream: INetStream, peer_id: str) -> AsyncIterator[None]:
    """Reset, EOF, the connection gone: the link is over, which is no error; the
    stream is reset in any case."""
    try:
        yield
    except Exception as error:
        logger.debug("beats with %s ended: %r", peer_id, error)
    finally:
        with trio.CancelScope(shield=True):
            await reset_quietly(stream)
