"""Any node coordinates: place a request on its view, run it, fail over, hedge, fan out."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import numpy as np
import trio

from ._errors import ErrorCode, JobError
from ._node_info import NO_REQUIREMENTS, NodeIndex, Requirements
from ._request import InferenceRequest, InferenceResult
from ._stats import PeerStats, StatsConfig
from ._strategies import (
    DistributionStrategy,
    Placement,
    place,
    settle,
    shortlist,
    to_probe,
)

logger = logging.getLogger(__name__)

Send = Callable[[str, InferenceRequest, float], Awaitable[InferenceResult]]
RunLocal = Callable[[InferenceRequest], Awaitable[InferenceResult]]
Probe = Callable[[str, float], Awaitable[int]]  # (peer, timeout) -> its load now

# Strategies that read load ask their first candidates for it before sending (when
# that pays: `to_probe`); ROUND_ROBIN ranks by what a probe would not change.
PROBING = frozenset(
    {
        DistributionStrategy.LEAST_LOADED,
        DistributionStrategy.LATENCY_OPTIMIZED,
        DistributionStrategy.MODEL_SPECIFIC,
        DistributionStrategy.CAPABILITY_BASED,
    }
)

_current: ContextVar[DistributedModelOrchestrator] = ContextVar("distributed_orchestrator")


def get_distributed_orchestrator() -> DistributedModelOrchestrator:
    """The orchestrator of the node running in the current trio context."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError(
            "no node is running in this context; use it inside `async with open_node(...)`"
        ) from None


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    max_attempts: int = 3  # peers tried for one request (OVERLOADED answers not counted)
    hedge_delay_s: float = 0.05  # before the model's p95 from here is known
    hedge_quantile: float = 0.95
    shortlist: int = 4  # peers drawn per request from a large view (see `shortlist`)
    probe: bool = True  # ask the first candidates for their load when queues are long
    probe_timeout_s: float = 0.05  # a probe not answered by then is ignored
    probe_rtt_ms: float = 1.0  # the first guess of a probe's round trip, then measured
    probe_refresh_s: float = 10.0  # when probes stopped paying, try one again after this
    stats: StatsConfig = field(default_factory=StatsConfig)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.shortlist < 2:  # hedging and probing need a second candidate
            raise ValueError(f"shortlist must be >= 2, got {self.shortlist}")


@dataclass(slots=True)
class OrchestratorCounts:
    """What the orchestrator did beyond one send per request, by model, since it
    started: plain counts that a node's metrics read when they are scraped."""

    # sends to another peer after a retryable failure
    failovers: Counter[str] = field(default_factory=Counter)
    # second sends because the first peer was slower than its p95
    hedges: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class ModelOutcome:
    model_id: str
    result: InferenceResult | None
    error: JobError | None


@dataclass(frozen=True, slots=True)
class ParallelResult:
    """Every model's outcome; a partial failure is reported here, not raised."""

    outcomes: tuple[ModelOutcome, ...]

    def results(self) -> list[InferenceResult]:
        return [o.result for o in self.outcomes if o.result is not None]

    def errors(self) -> dict[str, JobError]:
        return {o.model_id: o.error for o in self.outcomes if o.error is not None}


class DistributedModelOrchestrator:
    """Places and runs requests for one node.

    `index()` returns the node's current view as a NodeIndex (this node
    included, marked `is_local`); `send(peer, request, timeout)` runs a request
    on a peer; `run_local(request)` runs it here, with no network hop;
    `probe(peer, timeout)` asks a peer (this node included) for its load now.
    All raise JobError on failure.

    Load information comes from three places, the freshest winning: gossip (up
    to a record interval old), the load each answer reports, and, when queues
    are long and requests heavy enough to pay for it (`worth_probing`), a probe
    of the first two candidates just before sending.
    """

    def __init__(
        self,
        local_peer_id: str,
        index: Callable[[], NodeIndex],
        send: Send,
        run_local: RunLocal,
        probe: Probe | None = None,
        *,
        config: OrchestratorConfig = OrchestratorConfig(),
        rng: random.Random | None = None,
    ) -> None:
        self.local_peer_id = local_peer_id
        self.config = config
        self.stats = PeerStats(config.stats)
        self.counts = OrchestratorCounts()
        self._index = index
        self._send = send
        self._run_local = run_local
        self._probe = probe if config.probe else None
        self._probe_rtt_ms = config.probe_rtt_ms
        self._probed_at = -math.inf
        self._rng = rng or random.Random()

    def activate(self) -> object:
        """Make this the context's orchestrator (for get_distributed_orchestrator)."""
        return _current.set(self)

    def deactivate(self, token: object) -> None:
        _current.reset(token)  # type: ignore[arg-type]

    def placement(
        self,
        model_id: str,
        strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
        requirements: Requirements = NO_REQUIREMENTS,
    ) -> Placement:
        """Where `model_id` would run now, best first, with reasons; runs nothing."""
        return place(
            strategy,
            model_id,
            self._index(),
            self.stats,
            now=trio.current_time(),
            rng=self._rng,
            requirements=requirements,
        )

    async def run_distributed_inference(
        self,
        request: InferenceRequest,
        strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
        *,
        hedge: bool = False,
    ) -> InferenceResult:
        """Run `request` on the best peer; on a retryable failure try the next, within
        the request's deadline. Raises JobError."""
        deadline = trio.current_time() + request.timeout
        last: list[JobError] = []
        with trio.move_on_at(deadline):
            return await self._place_and_run(request, strategy, hedge, deadline, last)
        if last and last[-1].code is ErrorCode.OVERLOADED:
            raise JobError(
                ErrorCode.OVERLOADED,
                f"every peer serving {request.model_id} stayed overloaded "
                f"for {request.timeout:g} s",
            )
        raise JobError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"job {request.job_id} on {request.model_id} took over "
            f"{request.timeout:g} s" + (f"; last error: {last[-1]}" if last else ""),
        )

    async def _place_and_run(
        self,
        request: InferenceRequest,
        strategy: DistributionStrategy,
        hedge: bool,
        deadline: float,
        last: list[JobError],
    ) -> InferenceResult:
        tried: set[str] = set()
        attempts = 0
        while True:
            index = self._index()
            listed = shortlist(
                strategy,
                request.model_id,
                index,
                self.stats,
                now=trio.current_time(),
                rng=self._rng,
                requirements=request.requirements,
                size=self.config.shortlist,
                exclude=tried,
            )
            if not listed.candidates:
                placement = self.placement(request.model_id, strategy, request.requirements)
                await self._nothing_to_try(request, placement, last, tried)
                continue
            if attempts >= self.config.max_attempts:
                raise last[-1]
            if strategy in PROBING:
                listed = await self._settled(listed, index, deadline, strategy, request)
            peers = [c.peer_id for c in listed.candidates[: 2 if hedge else 1]]
            self.stats.placed(request.model_id)
            if last:
                self.counts.failovers[request.model_id] += 1
            try:
                if len(peers) == 2:
                    return await self._hedged(peers[0], peers[1], request, deadline)
                return await self._attempt(peers[0], request, deadline)
            except JobError as error:
                if not error.retryable:
                    raise
                last.append(error)
                tried.update(peers)
                if error.code is not ErrorCode.OVERLOADED:
                    attempts += 1
                logger.info(
                    "job %s on %s failed (%s); trying another peer", request.job_id, peers, error
                )

    async def _settled(
        self,
        listed: Placement,
        index: NodeIndex,
        deadline: float,
        strategy: DistributionStrategy,
        request: InferenceRequest,
    ) -> Placement:
        """`listed`, its first candidates probed for their load and put back in order
        with it (`settle`) when that pays (`to_probe`)."""
        if self._probe is None:
            return listed
        now = trio.current_time()
        rtt_ms = self._probe_rtt_ms
        if now - self._probed_at >= self.config.probe_refresh_s:
            # Probes found too slow to pay are retried now and then: the network and
            # the peers change, and only a probe measures what a probe costs now.
            rtt_ms = min(rtt_ms, self.config.probe_rtt_ms)
        asked = to_probe(listed, index, self.stats, rtt_ms)
        if not asked:
            return listed
        self._probed_at = now
        timeout = max(0.0, min(self.config.probe_timeout_s, (deadline - now) / 4))
        async with trio.open_nursery() as nursery:
            for peer_id in asked:
                nursery.start_soon(self._ask_load, self._probe, peer_id, timeout)
        return settle(
            listed, index, self.stats, asked, strategy=strategy, requirements=request.requirements
        )

    async def _ask_load(self, probe: Probe, peer_id: str, timeout: float) -> None:
        """One probe: advice, never a reason to fail the job. A peer that fails it or
        does not answer in time keeps its estimate (the send itself will find out
        what is wrong with it). Answered probes teach what the next one costs."""
        started = trio.current_time()
        with trio.move_on_after(timeout):
            try:
                load = await probe(peer_id, timeout)
            except JobError as error:
                logger.debug("load probe of %s failed: %s", peer_id, error)
                return
            except Exception:
                logger.warning("load probe of %s failed unexpectedly", peer_id, exc_info=True)
                return
            now = trio.current_time()
            self.stats.reported(peer_id, load, now)
            if peer_id != self.local_peer_id:
                rtt_ms = (now - started) * 1e3
                self._probe_rtt_ms += 0.2 * (rtt_ms - self._probe_rtt_ms)

    async def _nothing_to_try(
        self, request: InferenceRequest, placement: Placement, last: list[JobError], tried: set[str]
    ) -> None:
        """No candidate left: fail with the reason, or wait for one to come back."""
        index = self._index()
        if not index.serving(request.model_id):
            raise JobError(
                ErrorCode.NO_CAPABLE_PEER,
                f"no peer serves model {request.model_id!r}; the network serves "
                f"{sorted(index.model_ids()) or 'nothing'}",
                peer=self.local_peer_id,
            )
        backing_off = [e for e in placement.excluded if e.backing_off]
        if not placement.candidates and placement.excluded and not backing_off:
            reasons = "; ".join(f"{e.peer_id}: {e.reason}" for e in placement.excluded)
            raise JobError(
                ErrorCode.NO_CAPABLE_PEER,
                f"no peer serving {request.model_id} meets the requirements ({reasons})",
                peer=self.local_peer_id,
            )
        if last and last[-1].code is not ErrorCode.OVERLOADED and not backing_off:
            raise last[-1]
        # Everyone is overloaded or backing off: wait for the first to come back.
        now = trio.current_time()
        wake = min((self.stats.backoff_until(e.peer_id) for e in backing_off), default=now)
        await trio.sleep_until(max(wake, now + self.config.stats.overloaded_backoff_s))
        tried.clear()

    async def _attempt(
        self, peer_id: str, request: InferenceRequest, deadline: float
    ) -> InferenceResult:
        self.stats.sent(peer_id)
        started = trio.current_time()
        try:
            if peer_id == self.local_peer_id:
                result = await self._run_local(request)
            else:
                result = await self._send(peer_id, request, max(0.001, deadline - started))
        except JobError as error:
            if error.retryable:  # the caller's own mistakes say nothing about the peer
                self.stats.failed(
                    peer_id, trio.current_time(), overloaded=error.code is ErrorCode.OVERLOADED
                )
            raise
        finally:
            self.stats.done(peer_id)
        now = trio.current_time()
        latency_ms = (now - started) * 1e3
        self.stats.succeeded(peer_id, request.model_id, latency_ms, now, result.compute_ms)
        if result.load is not None:
            self.stats.reported(peer_id, result.load, now)
        return result

    async def _hedged(
        self, first: str, second: str, request: InferenceRequest, deadline: float
    ) -> InferenceResult:
        """Ask `first`; if it has not answered after the usual p95, ask `second` too.
        The first answer wins and the other request is cancelled."""
        p95 = self.stats.latency_quantile_ms(request.model_id, self.config.hedge_quantile)
        delay = self.config.hedge_delay_s if p95 is None else p95 / 1e3
        winner: list[InferenceResult] = []
        errors: list[JobError] = []
        first_failed = trio.Event()

        async def ask(peer_id: str, wait: float, scope: trio.CancelScope) -> None:
            if wait:
                with trio.move_on_after(wait) as slow:
                    await first_failed.wait()
                counts = self.counts.hedges if slow.cancelled_caught else self.counts.failovers
                counts[request.model_id] += 1
            try:
                winner.append(await self._attempt(peer_id, request, deadline))
                scope.cancel()
            except JobError as error:
                errors.append(error)
                first_failed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, first, 0.0, nursery.cancel_scope)
            nursery.start_soon(ask, second, delay, nursery.cancel_scope)
        if winner:
            return winner[0]
        raise errors[0]

    async def run_distributed_parallel_inference(
        self,
        request: InferenceRequest,
        model_ids: Sequence[str],
        strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
    ) -> ParallelResult:
        """Run the same inputs on several models at once, each placed on its own."""
        outcomes: dict[str, ModelOutcome] = {}

        async def one(model_id: str) -> None:
            sub = replace(request, model_id=model_id, job_id=f"{request.job_id}/{model_id}")
            try:
                result = await self.run_distributed_inference(sub, strategy)
                outcomes[model_id] = ModelOutcome(model_id, result, None)
            except JobError as error:
                outcomes[model_id] = ModelOutcome(model_id, None, error)

        async with trio.open_nursery() as nursery:
            for model_id in dict.fromkeys(model_ids):
                nursery.start_soon(one, model_id)
        return ParallelResult(tuple(outcomes[m] for m in dict.fromkeys(model_ids)))


def majority_vote(results: Sequence[InferenceResult], output: str = "label") -> np.ndarray:
    """Per row, the label most models gave (ties go to the smallest label)."""
    if not results:
        raise ValueError("majority_vote needs at least one result")
    votes = np.stack([np.asarray(r.outputs[output]) for r in results])
    return np.array([np.bincount(column).argmax() for column in votes.T.astype(np.int64)])


def mean(results: Sequence[InferenceResult], output: str) -> np.ndarray:
    """The element-wise mean of one output across models (regression, embeddings, scores)."""
    if not results:
        raise ValueError("mean needs at least one result")
    stacked = np.stack([np.asarray(r.outputs[output], dtype=np.float64) for r in results])
    return np.asarray(stacked.mean(axis=0), dtype=np.float64)
