"""Coordinating a chain: a job or a generation on a model served as stages.

The coordinator places the chain (`scheduler.plan_chain` over the view's stage
offers), opens a session on the first stage's peer (itself, without a hop, when
it serves the first stage) and sends each step down the chain (see `_stages`).

Failover, as Petals does it: when a stage peer dies (the hop before it cannot
reach it, or its stream breaks), the chain answers `StageFailure` naming it; the
coordinator places the chain again without that peer (nor any other that failed
this job: a peer that comes back is not used for the running session), opens
new sessions, and replays what the stages need to rebuild their caches: for a
generation, the prompt and every token generated so far, in one prefill. The
caller sees the same tokens and no error.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from tokenizers import Tokenizer

from scheduler import (
    ChainPlan,
    DistributionStrategy,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    NodeInfo,
    StageOffer,
    estimate_whole,
    plan_chain,
)

from ._chain_text import StageText, fetch_stage_text, local_stage_text
from ._decoder import Sampling, choose_token
from ._download import FetchError
from ._repository import Postprocess, RepositoryError
from ._stages import (
    STEP_WAIT_S,
    Answer,
    Downstream,
    Hop,
    StageBatcher,
    StageFailure,
    StageSession,
    StageStep,
)
from ._text import TextModel

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
MAX_ATTEMPTS = 6  # chains tried for one job or one generation step
VIEW_CHECK_S = 0.25  # while a step is out: how often the chain's peers are checked


@dataclass(slots=True)
class HopTimes:
    """What the coordinator measured: per step, the wall time of the chain."""

    steps_ms: list[float] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)  # seconds from failure to answer


class ChainSession:
    """One session along a placed chain: each `step` goes down it, and its answer
    comes from the last stage's peer straight to this node."""

    def __init__(self, chains: Chains, plan: ChainPlan) -> None:
        self.chains = chains
        self.plan = plan
        self.id = secrets.token_hex(8)
        self._answers_in, self._answers = trio.open_memory_channel[Answer](4)
        chains.sessions[self.id] = (plan.hops[-1].peer_id, self._answers_in)
        node = chains.node
        hops = tuple(Hop(h.peer_id, h.model_id) for h in plan.hops)
        reply = (node.peer_id, self.id)
        self._head: StageSession | None = None
        if hops[0].peer_id == node.peer_id:
            self._head = StageSession(node, hops, reply)
            self._down = self._head.down
        else:
            self._down = Downstream(node, hops, reply)
        if self._down is not None:
            chains.nursery.start_soon(self._watch, self._down)

    async def _watch(self, down: Downstream) -> None:
        failure = await down.watch()
        if not down.closed:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._answers_in.send_nowait(failure)

    async def step(self, tensors: Mapping[str, Array], last_only: bool) -> dict[str, Array]:
        """The chain's answer; ChainFailed when it fails."""
        step = StageStep(dict(tensors), (), last_only)
        try:
            if self._head is not None:
                failure = await self._head.step(step)
            else:
                assert self._down is not None
                failure = await self._down.send(step)
        except JobError as error:
            failure = StageFailure(error.code, error.message)
        if failure is not None:
            raise ChainFailed(failure)
        deadline = trio.current_time() + STEP_WAIT_S
        while True:
            with trio.move_on_after(VIEW_CHECK_S):
                answer = await self._answers.receive()
                break
            # A stage peer that stopped without its connections dropping (frozen,
            # cut off) leaves the view by the failure detector: fail over then.
            gone = self._gone()
            if gone:
                raise ChainFailed(
                    StageFailure(
                        ErrorCode.PEER_UNREACHABLE, f"stage peer {gone} left the view", gone
                    )
                )
            if trio.current_time() > deadline:
                raise ChainFailed(
                    StageFailure(ErrorCode.DEADLINE_EXCEEDED, "the chain did not answer")
                )
        if isinstance(answer, StageFailure):
            raise ChainFailed(answer)
        return answer

    def _gone(self) -> str:
        """A peer of this chain that the view no longer counts alive, or ''."""
        node = self.chains.node
        alive = {p.peer_id for p in node.view.snapshot().alive()} | {node.peer_id}
        return next((p for p in self.plan.peers if p not in alive), "")

    async def close(self) -> None:
        self.chains.sessions.pop(self.id, None)
        self._answers_in.close()
        with trio.CancelScope(shield=True):
            if self._head is not None:
                await self._head.close()
            elif self._down is not None:
                await self._down.close()


class ChainFailed(Exception):
    def __init__(self, failure: StageFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Chains:
    """A node's chains: placing them, running jobs and generations through them."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.rtt_ms: dict[str, float] = {}
        self.compute_ms: dict[str, float] = {}  # this node's stages: EWMA of a run, ms
        self.batchers: dict[str, StageBatcher] = {}  # stage model id -> its decode batches
        # Stage sessions here by (the peer before, its key): their rows come in one frame.
        self.stage_keys: dict[tuple[str, int], StageSession] = {}
        self.stage_unbatched: set[str] = set()  # peers that do not speak stage /1.1.0
        self.answer_unbatched: set[str] = set()  # ... nor stage-answer /1.1.0
        self.times = HopTimes()
        self.last_executor = ""  # the last stage's peer of the last job
        # Open sessions: id -> (the last stage's peer, where its answers go).
        self.sessions: dict[str, tuple[str, trio.MemorySendChannel[Answer]]] = {}
        self.nursery: trio.Nursery  # set by open_node: the sessions' watchers run in it
        self._offers: list[StageOffer] = []
        self._offers_source: object = None
        self._parents: frozenset[str] = frozenset()
        self._texts: dict[str, StageText] = {}  # by parent: its text side (_chain_text)
        self._text_locks: dict[str, trio.Lock] = {}
        self._text_models: dict[str, tuple[tuple[StageText, Any], TextModel]] = {}

    def deliver(self, session_id: str, sender: str, answer: Answer) -> bool:
        """An answer from the last stage's peer of an open session; False when there
        is no such session (or `sender` is not its last stage's peer)."""
        entry = self.sessions.get(session_id)
        if entry is None or entry[0] != sender:
            return False
        try:
            entry[1].send_nowait(answer)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def offers(self) -> list[StageOffer]:
        """Every stage the view (this node included) serves; kept until the view
        changes, so that the job path's `prefers_chain` costs a lookup."""
        snapshot = self.node.view.snapshot()
        if self._offers_source is snapshot:
            return self._offers
        offers = []
        for peer in snapshot.alive():
            for entry in peer.record.models:
                if entry.stage is not None:
                    s = entry.stage
                    offers.append(
                        StageOffer(s.parent, s.index, s.k, entry.descriptor.id, peer.peer_id)
                    )
        for descriptor in self.node.models:
            card = self.node.executor.models.card(descriptor.id)
            if card is not None and card.stage is not None:
                s2 = card.stage
                offers.append(StageOffer(s2.parent, s2.index, s2.k, card.id, self.node.peer_id))
        self._offers, self._offers_source = offers, snapshot
        self._parents = frozenset(o.parent for o in offers)
        return offers

    def plan(self, parent: str, exclude: Sequence[str] = ()) -> ChainPlan:
        """The chain for `parent`; JobError(NO_CAPABLE_PEER) when no split is complete."""
        index = self.node.node_index()
        nodes: dict[str, NodeInfo] = {n.peer_id: n for n in index.nodes}
        plan = plan_chain(
            parent,
            self.offers(),
            nodes,
            self.rtt_ms,
            exclude=frozenset(exclude),
            local_peer_id=self.node.peer_id,
        )
        if plan is None:
            raise JobError(
                ErrorCode.NO_CAPABLE_PEER,
                f"no complete chain of stages of {parent!r} in the view"
                + (f" without the failed peers {sorted(exclude)}" if exclude else ""),
            )
        return plan

    def prefers_chain(self, model_id: str) -> bool:
        """Whether a job on `model_id` should go through a chain of its stages: some
        split is complete, and no peer serves it whole or the chain's estimate is
        lower than the best whole peer's (same terms: compute, load, latency)."""
        offers = self.offers()
        if model_id not in self._parents:
            return False
        index = self.node.node_index()
        nodes = {n.peer_id: n for n in index.nodes}
        plan = plan_chain(model_id, offers, nodes, self.rtt_ms, local_peer_id=self.node.peer_id)
        if plan is None:
            return False
        whole = estimate_whole(model_id, nodes, self.rtt_ms, self.node.peer_id)
        return whole is None or plan.estimate_ms < whole[0]

    async def run_selected(
        self, request: InferenceRequest, strategy: DistributionStrategy, hedge: bool
    ) -> InferenceResult:
        """How this node runs a model named or selected for a job: through a chain of
        its stages when `prefers_chain`, else whole on the best peer (the scheduler)."""
        model_id, timeout = request.model_id, request.timeout
        if not self.prefers_chain(model_id):
            return await self.node.orchestrator.run_distributed_inference(
                request, strategy, hedge=hedge
            )
        result: InferenceResult
        if request.texts:
            result = await self.run_text_job(
                request.job_id, model_id, request.texts, request.truncate, timeout
            )
        else:
            result = await self.run_job(request.job_id, model_id, request.inputs, timeout)
        if not request.outputs:
            return result
        unknown = [name for name in request.outputs if name not in result.outputs]
        if unknown:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model_id} has no output {unknown[0]!r}; "
                f"its outputs are {sorted(result.outputs)}",
            )
        return replace(result, outputs={name: result.outputs[name] for name in request.outputs})

    async def run_job(
        self, job_id: str, model_id: str, tensors: Mapping[str, Array], timeout: float
    ) -> Any:
        """A tensor job through a chain, as the job protocol answers it, by `timeout` s."""
        started = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                outputs = await self.run(model_id, tensors)
        except trio.TooSlowError:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, f"the chain took longer than {timeout:g} s"
            ) from None
        return InferenceResult(
            job_id=job_id,
            model_id=model_id,
            outputs=outputs,
            executor=self.last_executor,
            queue_ms=0.0,
            compute_ms=(time.perf_counter() - started) * 1e3,
        )

    async def run(self, parent: str, tensors: Mapping[str, Array]) -> dict[str, Array]:
        """One job through a chain of `parent`'s stages (e.g. an embedding)."""
        failed: list[str] = []
        for _ in range(MAX_ATTEMPTS):
            plan = self.plan(parent, failed)
            session = ChainSession(self, plan)
            try:
                started = time.perf_counter()
                answer = await session.step(tensors, last_only=False)
                self._timed(plan, time.perf_counter() - started)
                self.last_executor = plan.hops[-1].peer_id
                return answer
            except ChainFailed as failure:
                if not self._blame(failure.failure, failed):
                    raise failure.failure.error() from None
            finally:
                await session.close()
        raise JobError(ErrorCode.PEER_UNREACHABLE, f"chain of {parent!r} failed {MAX_ATTEMPTS}x")

    async def generate(
        self,
        parent: str,
        prompt: Sequence[int],
        max_new: int,
        sampling: Sampling | None = None,
        eos_token_id: int | None = None,
    ) -> AsyncIterator[int]:
        """Token ids after `prompt`, each decode step flowing down the chain; a stage
        peer that dies is replaced and its session rebuilt from the tokens so far."""
        sampling = sampling or Sampling()
        rng = np.random.default_rng(sampling.seed)
        tokens: list[int] = []
        failed: list[str] = []
        session: ChainSession | None = None
        failed_at: float | None = None
        try:
            while len(tokens) < max_new:
                if session is None:
                    session = ChainSession(self, self.plan(parent, failed))
                    feeds = _prefill(list(prompt) + tokens)
                else:
                    feeds = _decode_step(tokens[-1], len(prompt) + len(tokens) - 1)
                started = time.perf_counter()
                try:
                    answer = await session.step(feeds, last_only=True)
                except ChainFailed as failure:
                    await session.close()
                    session = None
                    if len(failed) >= MAX_ATTEMPTS or not self._blame(failure.failure, failed):
                        raise failure.failure.error() from None
                    failed_at = failed_at or time.perf_counter()
                    continue
                self._timed(session.plan, time.perf_counter() - started)
                self.last_executor = session.plan.hops[-1].peer_id
                if failed_at is not None:
                    self.times.failovers.append(time.perf_counter() - failed_at)
                    failed_at = None
                token = choose_token(answer["logits"][0, -1], sampling, rng)
                tokens.append(token)
                yield token
                if token == eos_token_id:
                    return
        finally:
            if session is not None:
                with trio.CancelScope(shield=True):
                    await session.close()

    async def run_text_job(
        self, job_id: str, model_id: str, texts: Sequence[str], truncate: bool, timeout: float
    ) -> InferenceResult:
        """A text job through a chain: tokenized here with the model's tokenizer (see
        `stage_text`), answered as the executor answers text jobs, by `timeout` s."""
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as waited:  # reading a tokenizer from a peer counts too
            text = await self.text_model(model_id)
        if waited.cancelled_caught:
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"no tokenizer of {model_id} within the job's {timeout:g} s",
            )
        job = text.prepare(
            texts, truncate=truncate, max_rows=self.node.config.executor.max_batch_rows
        )
        left = max(deadline - trio.current_time(), 1e-3)
        result: InferenceResult = await self.run_job(job_id, model_id, job.feeds, left)
        outputs, labels = job.finish(result.outputs)
        return replace(result, outputs=outputs, labels=labels)

    async def stage_text(self, parent: str) -> StageText:
        """`parent`'s `[text]` table and tokenizer: beside a stage of it this node
        serves, or else read once from a peer serving one (`_chain_text`) and kept.
        JobError(NO_CAPABLE_PEER) naming why when neither has them."""
        found = self._texts.get(parent)
        if found is not None:
            return found
        async with self._text_locks.setdefault(parent, trio.Lock()):
            found = self._texts.get(parent) or local_stage_text(self.node, parent)
            if found is None:
                try:
                    found = await fetch_stage_text(
                        self.node, parent, self.offers(), self.node.fetches.count_corrupt
                    )
                except FetchError as error:
                    raise JobError(
                        ErrorCode.NO_CAPABLE_PEER,
                        f"model {parent} is served only as stages, and this node has no "
                        f"tokenizer for it: {error.message}",
                    ) from None
            self._texts[parent] = found
            return found

    async def text_model(self, parent: str) -> TextModel:
        """`parent`'s text side for one-shot text jobs: its `[text]` table and tokenizer
        (`stage_text`), and the first and last stages' descriptors (the parent's inputs
        and outputs) from the view. JobError naming what is missing."""
        text = await self.stage_text(parent)
        spec = text.spec()
        if spec.postprocess is Postprocess.GENERATE:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {parent} generates text: run it as a generation, not a one-shot job",
            )
        ends: dict[int, Any] = {}
        views = [(o, self._descriptor(o.peer_id, o.model_id)) for o in self.offers()]
        for offer, descriptor in views:
            if offer.parent == parent and descriptor is not None:
                if offer.index == 0:
                    ends.setdefault(0, descriptor)
                if offer.index == offer.k - 1:
                    ends.setdefault(1, descriptor)
        if len(ends) < 2:
            raise JobError(
                ErrorCode.NO_CAPABLE_PEER, f"no first and last stage of {parent!r} in the view"
            )
        descriptor = replace(ends[1], id=parent, inputs=ends[0].inputs)
        kept = self._text_models.get(parent)
        if kept is not None and kept[0][0] is text and kept[0][1] == descriptor:
            return kept[1]
        try:
            model = TextModel.with_tokenizer(descriptor, spec, text.tokenizer())
        except RepositoryError as error:
            raise JobError(ErrorCode.INTERNAL, f"model {parent}: {error}") from None
        self._text_models[parent] = ((text, descriptor), model)
        return model

    def _descriptor(self, peer_id: str, model_id: str) -> Any:
        """The descriptor of `model_id` as `peer_id` announces it (this node: its own)."""
        if peer_id == self.node.peer_id:
            return next((d for d in self.node.models if d.id == model_id), None)
        known = self.node.view.snapshot().peers.get(peer_id)
        entries = known.record.models if known is not None else ()
        return next((e.descriptor for e in entries if e.descriptor.id == model_id), None)

    async def text_side(self, parent: str) -> tuple[Tokenizer, int, int]:
        """The tokenizer, eos token id and context window of generator `parent`
        (`stage_text`). JobError when this node cannot have them."""
        return (await self.stage_text(parent)).generation()

    async def serve_generation(
        self, request: Any, send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """A `GenerateRequest` through a chain: pieces as the tokens come, then the
        summary, as the generate protocol answers."""
        from . import _codec
        from ._messages import GeneratedPiece, GenerateSummary

        started = time.perf_counter()
        tokenizer, eos, window = await self.text_side(request.model_id)
        prompt = tokenizer.encode(request.prompt).ids
        if not prompt or len(prompt) >= window:
            raise JobError(
                ErrorCode.INVALID_INPUT, f"the prompt must have 1 to {window - 1} tokens"
            )
        sampling = Sampling(request.temperature, request.top_k, request.top_p, request.seed)
        max_new = min(request.max_tokens, window - len(prompt))
        made: list[int] = []
        emitted, ttft_ms, finish = "", None, "length"
        async for token in self.generate(request.model_id, prompt, max_new, sampling, eos):
            if token == eos:
                finish = "eos"
                break
            made.append(token)
            text = tokenizer.decode(made)
            piece = ""
            if not text.endswith("\ufffd") and text.startswith(emitted):
                piece, emitted = text[len(emitted) :], text
            ttft_ms = ttft_ms or (time.perf_counter() - started) * 1e3
            await send(_codec.encode(GeneratedPiece((token,), piece)))
        total_ms = (time.perf_counter() - started) * 1e3
        summary = GenerateSummary(
            request.job_id,
            request.model_id,
            tokenizer.decode(made),
            len(made),
            finish,
            self.last_executor or self.node.peer_id,
            ttft_ms or total_ms,
            total_ms,
        )
        await send(_codec.encode(summary))

    def _blame(self, failure: StageFailure, failed: list[str]) -> bool:
        """Note the peer a failure names; whether another chain may do better."""
        if not failure.peer_id or not failure.code.retryable:
            return False
        logger.info("chain stage peer %s failed (%s); placing again", failure.peer_id, failure)
        failed.append(failure.peer_id)
        return True

    def _timed(self, plan: ChainPlan, seconds: float) -> None:
        ms = seconds * 1e3
        self.times.steps_ms.append(ms)
        first = plan.hops[0].peer_id
        if first != self.node.peer_id:
            old = self.rtt_ms.get(first)
            self.rtt_ms[first] = ms if old is None else old + 0.2 * (ms - old)


def _prefill(ids: Sequence[int]) -> dict[str, Array]:
    n = len(ids)
    return {
        "input_ids": np.array([list(ids)], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }


def _decode_step(token: int, position: int) -> dict[str, Array]:
    return {
        "input_ids": np.array([[token]], np.int64),
        "attention_mask": np.ones((1, position + 1), np.int64),
        "position_ids": np.array([[position]], np.int64),
    }
