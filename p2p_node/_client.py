"""Submit jobs to a node from trio code, with a throwaway identity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libp2p.crypto.ed25519 import create_new_key_pair

from gossip import ModelDescriptor
from scheduler import InferenceRequest, InferenceResult, Tensors

from ._config import parse_peer_multiaddr
from ._errors import unwrap_single_errors
from ._rpc import (
    JOB_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    REPLY_GRACE_S,
    Handler,
    Rpc,
    expect_reply,
    new_libp2p_host,
    run_host,
)
from ._wire import (
    ModelsReply,
    ModelsRequest,
    PeerReport,
    PeersReply,
    PeersRequest,
    Reply,
    Request,
    RunReply,
    RunRequest,
)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Client:
    """A connection to one node, which coordinates the jobs sent to it.

    ::

        async with Client.connect("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...") as client:
            result = await client.submit("digits-mlp", {"input": pixels})
    """

    def __init__(self, rpc: Rpc, peer_id: str) -> None:
        self._rpc = rpc
        self.peer_id = peer_id

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        addr: str,
        *,
        timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> AsyncIterator[Client]:
        """Dial `addr` (a multiaddr ending in /p2p/<peer id>). Raises JobError if unreachable."""
        target = parse_peer_multiaddr(addr)
        host = new_libp2p_host(create_new_key_pair())
        rpc = Rpc(
            host,
            max_request_bytes=max_message_bytes,
            max_reply_bytes=max_message_bytes,
            max_concurrent_inbound=1,
        )
        # Nodes ask every new connection for its models; a client serves none.
        rpc.serve(MODELS_PROTOCOL, _serve_no_models(rpc.peer_id))
        with unwrap_single_errors():
            async with run_host(host, []):
                peer_id = await rpc.connect(target, timeout)
                yield cls(rpc, peer_id)

    async def submit(
        self, model_id: str, inputs: Tensors, *, timeout: float = 30.0, job_id: str | None = None
    ) -> InferenceResult:
        """Run `model_id` on `inputs` somewhere in the network. Raises JobError on failure."""
        request = (
            InferenceRequest(model_id, inputs, timeout, job_id)
            if job_id
            else InferenceRequest(model_id, inputs, timeout)
        )
        return await self.run(request)

    async def run(self, request: InferenceRequest) -> InferenceResult:
        message = RunRequest(
            job_id=request.job_id,
            model_id=request.model_id,
            inputs=request.inputs,
            timeout_ms=max(1, round(request.timeout * 1000)),
        )
        reply = await self._rpc.call(
            self.peer_id, JOB_PROTOCOL, message, timeout=request.timeout + REPLY_GRACE_S
        )
        result: RunReply = expect_reply(reply, RunReply, self.peer_id)
        return InferenceResult(
            job_id=result.job_id,
            model_id=result.model_id,
            outputs=result.outputs,
            executor=result.executor,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
        )

    async def peers(self, *, timeout: float = 10.0) -> tuple[PeerReport, ...]:
        """The connected node's view of the network: each peer's record, age and state."""
        reply = await self._rpc.call(self.peer_id, PEERS_PROTOCOL, PeersRequest(), timeout)
        peers: PeersReply = expect_reply(reply, PeersReply, self.peer_id)
        return peers.peers

    async def models(self, *, timeout: float = 10.0) -> tuple[ModelDescriptor, ...]:
        """The models the connected node serves itself."""
        reply = await self._rpc.call(self.peer_id, MODELS_PROTOCOL, ModelsRequest(), timeout)
        models: ModelsReply = expect_reply(reply, ModelsReply, self.peer_id)
        return models.models


def _serve_no_models(peer_id: str) -> Handler:
    async def answer(request: Request, sender: str) -> Reply:
        return ModelsReply(peer_id, ())

    return answer
