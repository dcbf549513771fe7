"""The libp2p edge: host construction and request/response over our wire codec.

This module only moves bytes. Everything libp2p can raise is translated here,
once, into `JobError`s with an `ErrorCode`; nothing above it sees a libp2p
exception.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.request_response import (
    MessageTooLargeError,
    ProtocolNotSupportedError,
    RequestContext,
    RequestEncodeError,
    RequestResponse,
    RequestResponseCodec,
    RequestResponseConfig,
    RequestResponseError,
    RequestTimeoutError,
    ResponseDecodeError,
)
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from scheduler import ErrorCode, JobError

from . import _wire
from ._wire import ErrorReply, Reply, Request, WireError

logger = logging.getLogger(__name__)

INFER_PROTOCOL = TProtocol("/p2p-node/infer/1.0.0")
JOB_PROTOCOL = TProtocol("/p2p-node/job/1.0.0")
MODELS_PROTOCOL = TProtocol("/p2p-node/models/1.0.0")

# Multistream negotiation of a new stream; libp2p's default is 30 s.
NEGOTIATE_TIMEOUT_S = 5
# How long past a request's own deadline we wait for the peer's DEADLINE_EXCEEDED.
REPLY_GRACE_S = 2.0

Handler = Callable[[Request, str], Awaitable[Reply]]


def new_libp2p_host(key_pair: KeyPair) -> IHost:
    """A host that speaks TCP + Noise + Yamux and nothing weaker."""
    security = {
        NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    }
    connections = ConnectionConfig(
        # libp2p's auto-connector dials peerstore entries until it holds 50
        # connections; which peers a node talks to is ours to decide.
        min_connections=0,
        low_watermark=0,
        outbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
        inbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
    )
    return new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_preference="YAMUX",
        negotiate_timeout=NEGOTIATE_TIMEOUT_S,
        connection_config=connections,
    )


class _Codec:
    """libp2p's codec interface over our wire format.

    Request decoding never raises: a malformed request becomes a `WireError`
    value so that the handler can answer it with a typed error instead of
    libp2p resetting the stream.
    """

    def encode_request(self, request: Request) -> bytes:
        return _wire.encode(request)

    def decode_request(self, payload: bytes) -> Request | WireError:
        try:
            return _wire.decode_request(payload)
        except WireError as error:
            return error

    def encode_response(self, response: Reply) -> bytes:
        return _wire.encode(response)

    def decode_response(self, payload: bytes) -> Reply:
        return _wire.decode_reply(payload)


# Typed with Any for the request: we send `Request`s but decode `Request | WireError`.
_CODEC: RequestResponseCodec[Any, Reply] = _Codec()


class Rpc:
    """Sends our requests to peers and serves theirs, on one libp2p host."""

    def __init__(
        self,
        host: IHost,
        *,
        max_request_bytes: int,
        max_reply_bytes: int,
        max_concurrent_inbound: int,
    ) -> None:
        self.host = host
        self.peer_id = str(host.get_id())
        self._rr = RequestResponse(host)
        self._max_request_bytes = max_request_bytes
        self._max_reply_bytes = max_reply_bytes
        self._max_concurrent_inbound = max_concurrent_inbound

    async def connect(self, addr: multiaddr.Multiaddr, timeout: float) -> str:
        """Dial a peer by its full multiaddr; returns its peer id."""
        info = info_from_p2p_addr(addr)
        try:
            with trio.fail_after(timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"no answer from {addr} within {timeout:g} s"
            ) from None
        except Exception as error:  # libp2p's dial errors share no base class
            raise JobError(ErrorCode.PEER_UNREACHABLE, f"cannot reach {addr}: {error}") from None
        return str(info.peer_id)

    async def call(
        self, peer_id: str, protocol: TProtocol, request: Request, timeout: float
    ) -> Reply:
        """One request/response exchange. Transport failures raise `JobError`."""
        config = RequestResponseConfig(
            timeout=timeout,
            max_request_size=self._max_request_bytes,
            max_response_size=self._max_reply_bytes,
        )
        try:
            reply: Reply = await self._rr.send_request(
                ID.from_base58(peer_id), [protocol], request, _CODEC, config
            )
            return reply
        except RequestEncodeError as error:
            # Our own encoder refused the request (e.g. a tensor dtype the wire lacks).
            if isinstance(error.__cause__, JobError):
                raise error.__cause__ from None
            raise
        except RequestTimeoutError:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s", peer=peer_id
            ) from None
        except MessageTooLargeError as error:
            raise JobError(ErrorCode.MESSAGE_TOO_LARGE, str(error), peer=peer_id) from None
        except ProtocolNotSupportedError:
            raise JobError(
                ErrorCode.PEER_UNREACHABLE, f"peer does not speak {protocol}", peer=peer_id
            ) from None
        except ResponseDecodeError as error:
            cause = error.__cause__
            message = cause.message if isinstance(cause, WireError) else str(error)
            raise JobError(
                ErrorCode.MALFORMED_MESSAGE, f"bad reply: {message}", peer=peer_id
            ) from None
        except RequestResponseError as error:
            raise JobError(ErrorCode.PEER_UNREACHABLE, str(error), peer=peer_id) from None

    def serve(self, protocol: TProtocol, handler: Handler) -> None:
        """Answer `protocol` with `handler`; every failure becomes an ErrorReply."""

        async def answer(request: Request | WireError, context: RequestContext) -> Reply:
            if isinstance(request, WireError):
                logger.info(
                    "malformed %s request from %s: %s", protocol, context.peer_id, request.message
                )
                return ErrorReply.from_error(request, self.peer_id)
            try:
                return await handler(request, str(context.peer_id))
            except JobError as error:
                return ErrorReply.from_error(error, self.peer_id)
            except Exception:
                # A node never crashes on what a peer sends: log the bug, answer INTERNAL.
                logger.exception(
                    "handler for %s failed on a request from %s", protocol, context.peer_id
                )
                return ErrorReply(
                    ErrorCode.INTERNAL, "internal error; see the node's log", self.peer_id
                )

        config = RequestResponseConfig(
            timeout=_wire.MAX_TIMEOUT_MS / 1000 + REPLY_GRACE_S,
            max_request_size=self._max_request_bytes,
            max_response_size=self._max_reply_bytes,
            max_concurrent_inbound=self._max_concurrent_inbound,
        )
        self._rr.set_handler(protocol, answer, _CODEC, config)


def expect_reply(reply: Reply, kind: type[Any], peer_id: str) -> Any:
    """`reply` if it is a `kind`; an ErrorReply is raised as its JobError."""
    if isinstance(reply, ErrorReply):
        raise reply.to_error()
    if not isinstance(reply, kind):
        raise JobError(
            ErrorCode.MALFORMED_MESSAGE,
            f"expected a {kind.__name__}, got a {type(reply).__name__}",
            peer=peer_id,
        )
    return reply
