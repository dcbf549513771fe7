"""Building and running a libp2p host: TCP + Noise + Yamux, with this project's patches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from . import _libp2p
from ._libp2p import PeerGate
from ._psk import PreSharedKey

# Multistream negotiation of a new stream; libp2p's default is 30 s.
NEGOTIATE_TIMEOUT_S = 5


def new_libp2p_host(
    key_pair: KeyPair,
    *,
    psk: PreSharedKey | None = None,
    gate: PeerGate | None = None,
) -> IHost:
    """A host that speaks TCP + Noise + Yamux and nothing weaker (mDNS: see _mdns).

    With a `psk` every connection is encrypted with it first (a libp2p private
    network): peers without the same key never complete a handshake. With a
    `gate`, connections with the peers it refuses end as soon as the handshake
    names them, whichever side dialed.

    Applies the patches of `_libp2p`: to the process (once), and to this host.
    """
    _libp2p.apply_to_process()
    security = {
        NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    }
    connections = ConnectionConfig(
        min_connections=0,
        # One connection per peer; with more allowed, a successful dial still waits
        # out the 250 ms happy-eyeballs delay before returning.
        max_connections_per_peer=1,
        low_watermark=0,
        outbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
        inbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        negotiate_timeout=NEGOTIATE_TIMEOUT_S,
        connection_config=connections,
        psk=psk.hex if psk else None,
    )
    if gate is not None:
        _libp2p.refuse_peers(host, gate)
    if psk is not None:
        _libp2p.log_refused_handshakes(host, psk)
    _libp2p.cache_addrs(host)
    _libp2p.bound_retransmission(host)
    return host


@asynccontextmanager
async def run_host(host: IHost, listen: Sequence[multiaddr.Multiaddr]) -> AsyncIterator[None]:
    """`host.run(listen)` without libp2p's auto-connector (see `_libp2p.auto_connector`)."""
    connector = _libp2p.auto_connector(host)
    async with host.run(listen):
        await connector.stop()
        yield
