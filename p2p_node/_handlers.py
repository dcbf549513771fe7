"""What a node answers on each of its protocols: one handler per request type.

The server has checked each request's type before a handler sees it (see
`Server.serve`); a handler checks who may ask, and answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from scheduler import DistributionStrategy, ErrorCode, InferenceRequest, InferenceResult, JobError
from selection import SelectionContext

from ._jobs import fingerprint, request_bytes
from ._messages import (
    DigestReply,
    DigestRequest,
    FeedbackReply,
    FeedbackRequest,
    LoadReply,
    LoadRequest,
    ModelsReply,
    ModelsRequest,
    PeerReport,
    PeersReply,
    PeersRequest,
    PlaceReply,
    PlaceRequest,
    RunRequest,
    SelectReply,
    SelectRequest,
    StatsReply,
    StatsRequest,
    SyncReply,
    SyncRequest,
)
from ._rpc import (
    INFER_PROTOCOL,
    JOB_PROTOCOL,
    LOAD_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    PLACE_PROTOCOL,
    SELECT_PROTOCOL,
    SYNC_PROTOCOL,
)
from ._serve import Server

if TYPE_CHECKING:
    from ._node import Node


def serve_node(server: Server, node: Node) -> None:
    """Answer every protocol of `node` on `server`."""
    handlers = NodeHandlers(node)
    server.serve(JOB_PROTOCOL, RunRequest, handlers.job)
    server.serve(INFER_PROTOCOL, RunRequest, handlers.infer)
    server.serve(MODELS_PROTOCOL, ModelsRequest, handlers.models)
    server.serve(PEERS_PROTOCOL, PeersRequest, handlers.peers)
    server.serve(PEERS_PROTOCOL, StatsRequest, handlers.stats)
    server.serve(PLACE_PROTOCOL, PlaceRequest, handlers.place)
    server.serve(SELECT_PROTOCOL, SelectRequest, handlers.select)
    server.serve(SELECT_PROTOCOL, FeedbackRequest, handlers.feedback)
    server.serve(LOAD_PROTOCOL, LoadRequest, handlers.load)
    server.serve(SYNC_PROTOCOL, SyncRequest, handlers.sync)
    server.serve(SYNC_PROTOCOL, DigestRequest, handlers.digest)


class NodeHandlers:
    """The node's answers, each `(request, sender peer id) -> reply`; raises JobError."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def job(self, request: RunRequest, sender: str) -> InferenceResult:
        """Coordinate one job: select its model when it names a task, place it on the
        view (this node included), run it there, fail over on retryable errors, all
        within its deadline. A job sent again (a client failing over) runs once."""
        node = self.node
        node.admission.admit_job(sender, trio.current_time())
        return await node.jobs.run(
            sender,
            request.job_id,
            lambda: fingerprint(request),
            lambda: self._coordinate(request),
            holds=request_bytes(request),
        )

    async def _coordinate(self, request: RunRequest) -> InferenceResult:
        """Run one job, and count it in the node's metrics by how it ended."""
        node = self.node
        strategy = request.strategy or node.config.strategy
        started = trio.current_time()
        node.note_load()
        try:
            result = await self._place_and_run(request, strategy)
        except JobError as error:
            node.metrics.job_failed(request.model_id, strategy.value, error.code.name.lower())
            raise
        except BaseException as error:  # the caller hung up or the node stops; or a bug
            outcome = "cancelled" if isinstance(error, trio.Cancelled) else "internal"
            node.metrics.job_failed(request.model_id, strategy.value, outcome)
            raise
        finally:
            node.note_load()
        node.metrics.job_answered(
            strategy.value,
            trio.current_time() - started,
            result,
            local=result.executor == node.peer_id,
        )
        return result

    async def _place_and_run(
        self, request: RunRequest, strategy: DistributionStrategy
    ) -> InferenceResult:
        node = self.node
        if request.task is not None:
            return await node.selector.run_task(
                request.task,
                request.inputs,
                strategy=request.selection or node.config.selection,
                context=request.context,
                distribution=strategy,
                timeout=request.timeout_ms / 1000,
                job_id=request.job_id,
                hedge=request.hedge,
                texts=request.texts,
                truncate=bool(request.truncate),
            )
        # Whole, or through a chain of its stages: node.chains.run_selected decides.
        return await node.selector.run_model(to_inference(request), strategy, hedge=request.hedge)

    async def infer(self, request: RunRequest, sender: str) -> InferenceResult:
        """Run a named model here (a coordinator placed it on this node)."""
        await self._admit_infer(sender)
        if request.task is not None:
            raise JobError(
                ErrorCode.MALFORMED_MESSAGE,
                "the infer protocol runs a named model; submit task jobs on the job protocol",
            )
        return await self._run_here_within_deadline(request)

    async def _admit_infer(self, sender: str) -> None:
        """Peers of the network may have this node run models; so may allowed clients
        (a batch sends its chunks straight to the peers that run them), each chunk
        taking one of the client's job tokens.

        A new peer's first request can come before its record, so an unknown
        sender is given a liveness ttl to appear in the view (by sync or gossip).
        """
        node = self.node
        if sender in node.view.snapshot().peers:
            return
        if node.admission.allows(sender):
            node.admission.admit_job(sender, trio.current_time())
            return
        with trio.move_on_after(node.config.gossip.liveness_ttl):
            await node.view.wait_until(lambda view: sender in view.peers)
            return
        raise node.admission.unauthorized(sender, "send infer requests")

    async def _run_here_within_deadline(self, request: RunRequest) -> InferenceResult:
        self.node.note_load()
        try:
            with trio.move_on_after(request.timeout_ms / 1000):
                return await self.node.run_local(to_inference(request))
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"model {request.model_id} did not finish within {request.timeout_ms} ms",
                peer=self.node.peer_id,
            )
        finally:
            self.node.note_load()

    async def load(self, request: LoadRequest, sender: str) -> LoadReply:
        node = self.node
        if not (node.admission.allows(sender) or sender in node.view.snapshot().peers):
            raise node.admission.unauthorized(sender, "probe its load")
        return LoadReply(node.peer_id, node.running, node.executor.queue_length)

    async def place(self, request: PlaceRequest, sender: str) -> PlaceReply:
        node = self.node
        placement = node.orchestrator.placement(
            request.model_id, request.strategy, request.requirements
        )
        return PlaceReply(node.peer_id, placement)

    async def feedback(self, request: FeedbackRequest, sender: str) -> FeedbackReply:
        node = self.node
        if not node.admission.allows(sender):
            raise node.admission.unauthorized(sender, "ask for selections or send feedback")
        models = node.selector.feedback(request.job_id, request.score)
        return FeedbackReply(node.peer_id, request.job_id, models)

    async def select(self, request: SelectRequest, sender: str) -> SelectReply:
        node = self.node
        if not node.admission.allows(sender):
            raise node.admission.unauthorized(sender, "ask for selections or send feedback")
        chosen = node.selector.rank_models(
            request.task, request.strategy, SelectionContext.parse(request.context), k=request.k
        )
        learned = node.selector.tracker.learned(r.model_id for r in chosen.ranked)
        return SelectReply(node.peer_id, chosen, learned)

    async def models(self, request: ModelsRequest, sender: str) -> ModelsReply:
        return ModelsReply(self.node.peer_id, self.node.models)

    async def peers(self, request: PeersRequest, sender: str) -> PeersReply:
        now = trio.current_time()
        reports = tuple(
            PeerReport(known.record, max(0.0, now - known.received_at), str(known.state))
            for _, known in sorted(self.node.view.snapshot().peers.items())
        )
        return PeersReply(self.node.peer_id, reports)

    async def stats(self, request: StatsRequest, sender: str) -> StatsReply:
        """What `p2p-node top` shows of this node: its load, and per model the jobs
        it coordinated with their latency."""
        node = self.node
        executor = node.executor
        return StatsReply(
            node.peer_id, executor.running, executor.queue_length, node.metrics.model_stats()
        )

    async def sync(self, request: SyncRequest, sender: str) -> SyncReply:
        gossip = self.node.gossip
        await gossip.take_synced(request.messages, sender)
        return SyncReply(gossip.signed_messages())

    async def digest(self, request: DigestRequest, sender: str) -> DigestReply:
        """Take the records the sender pushed, then send what its digest lacks; name
        the sender itself among the records wanted if we hold it departed."""
        gossip = self.node.gossip
        await gossip.take_synced(request.messages, sender)
        wants = gossip.wanted(request.digest)
        if gossip.holds_gone(sender, request.digest):
            wants += (sender,)
        return DigestReply(gossip.newer_than(request.digest), wants)


def to_inference(request: RunRequest) -> InferenceRequest:
    return InferenceRequest(
        model_id=request.model_id,
        inputs=request.inputs,
        timeout=request.timeout_ms / 1000,
        job_id=request.job_id,
        requirements=request.requirements,
        outputs=request.outputs,
        texts=request.texts,
        truncate=bool(request.truncate),
    )
