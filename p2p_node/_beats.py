"""Beats: a byte each way every interval on one stream per link, so that neighbours
know each other alive. Gossip reports a neighbour that goes silent.

A raw stream, not a request and reply: a beat is the cheapest thing a link can
carry (one yamux frame, one Noise message), and nodes beat to each other all
the time. Either side may write first; each side takes whatever it reads as a
beat. A node that is silenced (the harness's stall) writes nothing.
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from ._gossip import Gossip, reset_quietly
from ._rpc import SEND_TIMEOUT_S

logger = logging.getLogger(__name__)

BEAT_PROTOCOL = TProtocol("/p2p-node/beat/1.0.0")
BEAT = b"\x01"
READ_BYTES = 64  # a peer that sends more than a byte a beat gains nothing by it


async def beat_over(stream: INetStream, peer_id: str, gossip: Gossip, interval: float) -> None:
    """Until the stream ends: write a beat every `interval` (none while `gossip` is
    silenced), and tell `gossip` of every beat read from `peer_id`."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_beats, stream, gossip, interval)
            while await stream.read(READ_BYTES):
                gossip.heard_from(peer_id)
            nursery.cancel_scope.cancel()  # the peer closed its side
    except Exception as error:  # reset, EOF, the connection gone: the link is over
        logger.debug("beats with %s ended: %r", peer_id, error)
    finally:
        with trio.CancelScope(shield=True):
            await reset_quietly(stream)


async def _write_beats(stream: INetStream, gossip: Gossip, interval: float) -> None:
    while True:
        started = trio.current_time()
        if started >= gossip.silenced_until:
            # Shielded: a write cut halfway would break the connection's framing.
            with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT_S):
                await stream.write(BEAT)
        await trio.sleep_until(max(started + interval, gossip.silenced_until))
