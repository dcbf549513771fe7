"""`Client`: a node's client, from trio code.

A client is a libp2p host of its own (a throwaway identity, or one given for
nodes that admit jobs by peer id, in a private network when given its key),
connected to one node, which coordinates what it is sent. Through that node it
submits jobs (naming a model, or a task for the node to select a model for),
and asks it where a model would run, which models it would select, what it
knows of its peers and its models, and how busy it is; it scores a job's
answer with feedback. Given several addresses, a job whose node dies goes to
the next reachable one, with the same job id. Batches are in `_batch.py`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import replace
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol

from gossip import ModelDescriptor
from scheduler import (
    NO_REQUIREMENTS,
    DistributionStrategy,
    ErrorCode,
    InferenceRequest,
    InferenceResult,
    JobError,
    Placement,
    Requirements,
    Tensors,
    new_job_id,
)
from selection import AdvancedModelSelectionStrategy, Selection

from ._batch import BatchResult, submit_batch
from ._channel import MessageLimits
from ._config import parse_peer_multiaddr
from ._errors import unwrap_single_errors
from ._messages import (
    ContextValue,
    FeedbackReply,
    FeedbackRequest,
    GenerateRequest,
    Learned,
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
)
from ._psk import PreSharedKey
from ._rpc import (
    JOB_PROTOCOL,
    LOAD_PROTOCOL,
    MODELS_PROTOCOL,
    PEERS_PROTOCOL,
    PLACE_PROTOCOL,
    REPLY_GRACE_S,
    SELECT_PROTOCOL,
    Rpc,
    expect_reply,
    new_libp2p_host,
    open_rpc,
    run_host,
)
from ._stream_gen import GeneratePipes, GenerationStream, open_generation

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
FAILOVER_DIAL_TIMEOUT_S = 2.0
# A job's node is gone (not: it answered with an error about someone else).
_NODE_GONE = frozenset({ErrorCode.PEER_UNREACHABLE, ErrorCode.SHUTTING_DOWN})
logger = logging.getLogger(__name__)


class Client:
    """A connection to one node, which coordinates the jobs sent to it.

    ::

        async with Client.connect("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...") as client:
            result = await client.submit("digits-mlp", {"input": pixels})
    """

    def __init__(
        self,
        rpc: Rpc,
        peer_id: str,
        targets: Sequence[multiaddr.Multiaddr] = (),
        dial_timeout: float = FAILOVER_DIAL_TIMEOUT_S,
    ) -> None:
        self._rpc = rpc
        self.peer_id = peer_id  # the node jobs go to now
        self._targets = list(targets)
        self._dial_timeout = dial_timeout
        self._failing_over = trio.Lock()  # jobs that lose their node together move once
        self.failovers = 0
        self._generate_pipes = GeneratePipes(rpc)  # one kept generate stream per node

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        addr: str | Sequence[str],
        *,
        timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        psk: PreSharedKey | None = None,
        identity: KeyPair | None = None,
    ) -> AsyncIterator[Client]:
        """Dial `addr` (a multiaddr ending in /p2p/<peer id>), or the first reachable of
        several. Raises JobError if none is reachable.

        With several addresses, a job whose node dies (or shuts down) before it
        answers is sent again, with the same job id, to the next reachable one;
        a node answers each job id once.

        `psk`: the key of the node's private network, if it runs one. `identity`:
        the client's key pair, for nodes that admit jobs by peer id (default: a
        new throwaway identity).
        """
        addrs = [addr] if isinstance(addr, str) else list(addr)
        if not addrs:
            raise ValueError("connect needs at least one address")
        targets = [parse_peer_multiaddr(a) for a in addrs]
        host = new_libp2p_host(identity or create_new_key_pair(), psk=psk)
        limits = MessageLimits(max_message_bytes, max_message_bytes)
        with unwrap_single_errors():
            async with run_host(host, []), open_rpc(host, limits) as rpc:
                client = cls(rpc, "", targets, min(timeout, FAILOVER_DIAL_TIMEOUT_S))
                await client._connect_next(timeout, None)
                yield client

    async def _connect_next(self, timeout: float, error: JobError | None) -> None:
        """Make the next reachable target (after the current one) the node jobs go to."""
        current = next(
            (i for i, t in enumerate(self._targets) if t.get_peer_id() == self.peer_id), -1
        )
        order = self._targets[current + 1 :] + self._targets[: current + 1]
        failures = []
        for target in order:
            if target.get_peer_id() == self.peer_id and error is not None:
                continue  # the one that just failed
            try:
                self.peer_id = await self._rpc.connect(target, timeout)
                return
            except JobError as failure:
                failures.append(failure)
        if error is not None:
            raise error
        raise failures[-1]

    async def _job(self, message: RunRequest, timeout: float) -> InferenceResult:
        """Send a job; if its node dies before answering, send it to the next one."""
        deadline = trio.current_time() + timeout
        while True:
            left = deadline - trio.current_time()
            sent_to = self.peer_id
            try:
                reply = await self._rpc.call(
                    sent_to, JOB_PROTOCOL, message, timeout=max(0.001, left) + REPLY_GRACE_S
                )
                result: InferenceResult = expect_reply(reply, InferenceResult, sent_to)
                return result
            except JobError as error:
                node_gone = error.peer == sent_to and error.code in _NODE_GONE
                if not node_gone or len(self._targets) < 2 or left <= 0:
                    raise
                logger.info(
                    "job %s: %s; failing over",
                    message.job_id,
                    error,
                    extra={"job_id": message.job_id, "peer": sent_to},
                )
                async with self._failing_over:
                    if self.peer_id == sent_to:  # no other job has moved on yet
                        await self._connect_next(self._dial_timeout, error)
                        self.failovers += 1
                message = replace(
                    message, timeout_ms=max(1, round((deadline - trio.current_time()) * 1000))
                )

    async def submit(
        self,
        model_id: str,
        inputs: Tensors | None = None,
        *,
        texts: Sequence[str] | None = None,
        truncate: bool = False,
        timeout: float = 30.0,
        job_id: str | None = None,
        strategy: DistributionStrategy | None = None,
        requirements: Requirements = NO_REQUIREMENTS,
        hedge: bool = False,
        outputs: Sequence[str] = (),
    ) -> InferenceResult:
        """Run `model_id` on `inputs` somewhere in the network. Raises JobError on failure.

        The node placing the job uses `strategy`, or its own default when None. With
        `hedge`, it also asks a second peer when the first has not answered after
        its usual p95 latency; the first answer wins, the other request is cancelled.
        `outputs` names the outputs wanted (default: all the model's).

        A text model takes `texts` instead of `inputs`: the node that runs it
        tokenizes them. A sentence-embedding model answers `embeddings` (one unit
        vector per text), a text classifier `label`, `probabilities` and
        `result.labels`. `truncate` cuts a text longer than the model's window
        where the model would refuse it. Raises JobError INVALID_INPUT for no
        texts, an empty text, too many, or one too long.
        """
        request = InferenceRequest(
            model_id,
            _tensors_or_none(inputs, texts),
            timeout,
            job_id or new_job_id(),
            requirements,
            tuple(outputs),
            texts=_texts(texts),
            truncate=truncate,
        )
        return await self.run(request, strategy, hedge=hedge)

    async def submit_task(
        self,
        task: str,
        inputs: Tensors | None = None,
        *,
        texts: Sequence[str] | None = None,
        selection: AdvancedModelSelectionStrategy | str | None = None,
        context: Mapping[str, ContextValue | bool] | None = None,
        timeout: float = 30.0,
        job_id: str | None = None,
        strategy: DistributionStrategy | None = None,
        hedge: bool = False,
    ) -> InferenceResult:
        """Run `inputs` on whichever model the node selects for `task` (with `selection`,
        or its default, in `context`). `result.route` says which model answered how
        many rows. Raises JobError: UNKNOWN_TASK, NO_FITTING_MODEL, INVALID_SELECTION...

        A text task takes `texts` instead of `inputs`; the context's `input_length`
        is then counted in each candidate's tokens, and `truncate=true` in the
        context lets the job run, truncated, on the model with the largest window
        when no window is long enough."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        message = RunRequest(
            job_id=job_id or new_job_id(),
            model_id="",
            inputs=_tensors_or_none(inputs, texts),
            texts=_texts(texts),
            timeout_ms=max(1, round(timeout * 1000)),
            strategy=strategy,
            task=task,
            selection=None if selection is None else str(selection),
            context=_wire_context(context),
            hedge=hedge,
        )
        return await self._job(message, timeout)

    @asynccontextmanager
    async def generate(
        self,
        prompt: str,
        model_id: str | None = None,
        *,
        task: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        selection: AdvancedModelSelectionStrategy | str | None = None,
        context: Mapping[str, ContextValue] | None = None,
        strategy: DistributionStrategy | None = None,
        timeout: float = 60.0,
        job_id: str | None = None,
    ) -> AsyncIterator[GenerationStream]:
        """Generate text after `prompt` with `model_id`, or a model the node selects for
        `task`; the text comes piece by piece as the tokens are made::

            async with client.generate("Once upon", "gpt-small", max_tokens=50) as gen:
                async for piece in gen:
                    print(piece, end="", flush=True)
            print(gen.summary.executor, gen.summary.ttft_ms)

        Greedy at `temperature` 0; else sampled from the `top_k` most likely tokens
        (0: all), of those the fewest whose probabilities add up to `top_p`, drawn
        with `seed`: the same seed gives the same text on any node. Leaving the
        block before the end stops the generation where it runs. Raises JobError."""
        request = GenerateRequest(
            job_id=job_id or new_job_id(),
            model_id=model_id or "",
            prompt=prompt,
            max_tokens=max_tokens,
            timeout_ms=max(1, round(timeout * 1000)),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            task=task,
            selection=None if selection is None else str(selection),
            context=dict(context or {}),
            strategy=strategy,
        )
        peer_id = self.peer_id
        with trio.fail_after(timeout + REPLY_GRACE_S) if timeout else nullcontext():
            async with open_generation(
                self._generate_pipes, peer_id, request, self._dial_timeout
            ) as generation:
                yield generation

    async def generate_text(self, prompt: str, model_id: str | None = None, **options: Any) -> str:
        """The whole text `generate` makes (same arguments)."""
        async with self.generate(prompt, model_id, **options) as generation:
            return await generation.text()

    async def select(
        self,
        task: str,
        strategy: AdvancedModelSelectionStrategy | str = AdvancedModelSelectionStrategy.HYBRID,
        *,
        context: Mapping[str, ContextValue | bool] | None = None,
        k: int | None = None,
        timeout: float = 10.0,
    ) -> tuple[Selection, tuple[Learned, ...]]:
        """How the connected node would select models for `task` now, with scores and
        reasons, and what it has learned about them. Runs nothing."""
        request = SelectRequest(task, str(strategy), _wire_context(context), k)
        reply = await self._rpc.call(self.peer_id, SELECT_PROTOCOL, request, timeout)
        selected: SelectReply = expect_reply(reply, SelectReply, self.peer_id)
        return selected.selection, selected.learned

    async def feedback(
        self, job_id: str, score: float, *, timeout: float = 10.0
    ) -> tuple[str, ...]:
        """Tell the node that coordinated `job_id` how good its answer was, in [0, 1].
        Returns the models credited. Raises JobError UNKNOWN_JOB for a job it forgot."""
        reply = await self._rpc.call(
            self.peer_id, SELECT_PROTOCOL, FeedbackRequest(job_id, score), timeout
        )
        credited: FeedbackReply = expect_reply(reply, FeedbackReply, self.peer_id)
        return credited.model_ids

    async def run(
        self,
        request: InferenceRequest,
        strategy: DistributionStrategy | None = None,
        *,
        hedge: bool = False,
    ) -> InferenceResult:
        message = RunRequest(
            job_id=request.job_id,
            model_id=request.model_id,
            inputs=request.inputs,
            timeout_ms=max(1, round(request.timeout * 1000)),
            strategy=strategy,
            requirements=request.requirements,
            hedge=hedge,
            outputs=request.outputs,
            texts=request.texts,
            truncate=request.truncate or None,
        )
        return await self._job(message, request.timeout)

    async def submit_batch(
        self,
        model_id: str,
        inputs: Tensors,
        *,
        batch_size: int,
        strategy: DistributionStrategy | None = None,
        timeout: float = 30.0,
        concurrency: int = 8,
        direct: bool = True,
        outputs: Sequence[str] = (),
        on_progress: Callable[[int, int], None] | None = None,
    ) -> BatchResult:
        """Run many rows as chunks of `batch_size`, `concurrency` chunks at a time.
        Outputs come back in input order.

        With `direct`, the chunks go straight to the peers serving the model (those
        the node ranks first by `strategy`, and this client can reach), which pull
        them as they finish the last: no chunk is forwarded through the node. A chunk
        whose peer fails is redone elsewhere. Without it, or when no peer can be
        reached, every chunk is a job for the node, which places it. `outputs`
        names the outputs wanted (default: all the model's).
        """
        return await submit_batch(
            self,
            self._rpc,
            model_id,
            inputs,
            batch_size=batch_size,
            strategy=strategy,
            timeout=timeout,
            concurrency=concurrency,
            direct=direct,
            outputs=outputs,
            on_progress=on_progress,
            dial_timeout=self._dial_timeout,
        )

    async def place(
        self,
        model_id: str,
        strategy: DistributionStrategy = DistributionStrategy.LEAST_LOADED,
        *,
        requirements: Requirements = NO_REQUIREMENTS,
        timeout: float = 10.0,
    ) -> Placement:
        """Where the connected node would run `model_id` now, best first, with reasons."""
        request = PlaceRequest(model_id, strategy, requirements)
        reply = await self._rpc.call(self.peer_id, PLACE_PROTOCOL, request, timeout)
        placed: PlaceReply = expect_reply(reply, PlaceReply, self.peer_id)
        return placed.placement

    async def open_stream(self, protocol: TProtocol, *, timeout: float = 10.0) -> INetStream:
        """A new stream to the node for a protocol of its own (fetch progress)."""
        return await self._rpc.open_stream(self.peer_id, protocol, timeout)

    async def peers(self, *, timeout: float = 10.0) -> tuple[PeerReport, ...]:
        """The connected node's view of the network: each peer's record, age and state."""
        reply = await self._rpc.call(self.peer_id, PEERS_PROTOCOL, PeersRequest(), timeout)
        peers: PeersReply = expect_reply(reply, PeersReply, self.peer_id)
        return peers.peers

    async def load(self, *, timeout: float = 10.0) -> tuple[int, int]:
        """How busy the connected node is now: (requests running, requests queued), the
        answer a coordinator's probe gets."""
        reply = await self._rpc.call(self.peer_id, LOAD_PROTOCOL, LoadRequest(), timeout)
        answer: LoadReply = expect_reply(reply, LoadReply, self.peer_id)
        return answer.in_flight, answer.queue_length

    async def stats(self, *, timeout: float = 10.0) -> StatsReply:
        """What the connected node counts of itself (what `p2p-node top` shows): how
        busy it is, and per model the jobs it coordinated, errors, and p50/p99 ms."""
        reply = await self._rpc.call(self.peer_id, PEERS_PROTOCOL, StatsRequest(), timeout)
        stats: StatsReply = expect_reply(reply, StatsReply, self.peer_id)
        return stats

    async def models(self, *, timeout: float = 10.0) -> tuple[ModelDescriptor, ...]:
        """The models the connected node serves itself."""
        reply = await self._rpc.call(self.peer_id, MODELS_PROTOCOL, ModelsRequest(), timeout)
        models: ModelsReply = expect_reply(reply, ModelsReply, self.peer_id)
        return models.models


def _tensors_or_none(inputs: Tensors | None, texts: Sequence[str] | None) -> Tensors:
    """A job's tensors: `inputs`, or none for a text job; one of the two."""
    if (inputs is None) == (texts is None):
        raise JobError(ErrorCode.INVALID_INPUT, "a job carries inputs or texts: give one of them")
    return {} if inputs is None else inputs


def _texts(texts: Sequence[str] | None) -> tuple[str, ...]:
    """A text job's texts; INVALID_INPUT for an empty list (on the wire, no texts
    means a tensor job)."""
    if texts is None:
        return ()
    if isinstance(texts, str):
        raise JobError(ErrorCode.INVALID_INPUT, "texts is a list of strings, not one string")
    if not texts:
        raise JobError(ErrorCode.INVALID_INPUT, "texts is empty: a text job needs 1 or more texts")
    odd = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if odd is not None:
        kind = type(texts[odd]).__name__
        raise JobError(ErrorCode.INVALID_INPUT, f"text {odd} is {kind}, not str")
    return tuple(texts)


def _wire_context(context: Mapping[str, ContextValue | bool] | None) -> dict[str, ContextValue]:
    """`context` as the wire holds it: a bool (`truncate=True`) as its word."""
    return {
        k: ("true" if v else "false") if isinstance(v, bool) else v
        for k, v in (context or {}).items()
    }
