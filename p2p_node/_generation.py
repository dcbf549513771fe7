"""Text generation on the executing node: one session per request, holding its KV cache,
and one engine per model that runs the decode steps of all its sessions as one batch.

A decoder model is served in the layout of Hugging Face Optimum's decoder exports
(`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value`
in; `logits`, `present.{i}.key/value` out), described by the `[text]` table of
its model.toml (see `_decoder`).

A session tokenizes its prompt, allocates its cache for the prompt plus the
tokens it may generate (counted against the node's model memory budget), and
runs its prefill alone. It then joins its model's engine, which, step after
step, runs one token of every running session in one onnxruntime batch: the
caches, of different lengths, are left-padded to the longest and masked with
`attention_mask`; each row has its own `position_ids` (continuous batching, as
vLLM does it, without paging). Sessions join and leave between steps. A session
whose client has not taken its last tokens sits out of the batches until it
does; one idle for `session_idle_s` ends. Leaving the session's context (the
client hung up, the deadline passed) frees its cache at once.

A step of many rows (`WIDE_STEP_ROWS`), or a prefill run of many tokens
(`WIDE_PREFILL_TOKENS`), that starts while no other run holds a worker slot
may run on the model's wide session (`LoadedModel.wide`), with the threads of
every slot, which it takes for the run: its products may be large enough to
share between cores, where a step of one row's are not. Whether they are
depends on the size and on the machine, so each size class is measured: a run
of it on each session, one after the other, every WIDE_PROBE_EVERY runs, and
it goes wide while that was the faster by WIDE_MARGIN (`WideChoice`).

Each session samples with its own seeded generator (see `_decoder.choose_token`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import trio

from scheduler import ErrorCode, JobError

from ._config import ExecutorConfig
from ._decoder import (
    DecoderLayout,
    Sampling,
    TextGenerator,
    choose_token,
    load_text_generator,
    past_names,
    step_outputs,
)
from ._executor import Executor, give_back, take_free_slots
from ._repository import ModelCard

logger = logging.getLogger(__name__)

MB = 1 << 20
BUFFERED_TOKENS = 16  # generated but not taken by the client; past it the session waits
FRAME_TOKENS = 8  # pieces a frame waits for while other sessions share the batches
IDLE_INLINE_FACTOR = 4  # a prefill inline on an idle engine: up to this x inline_below_ms
STEP_INLINE_FACTOR = 4  # a decode step inline: up to this x inline_below_ms (see _Engine._step)
JOIN_WAIT_S = 0.005  # the most the batch waits for sessions about to join it (_Engine.run)
WIDE_STEP_ROWS = 8  # a decode step of this many rows may run wide (_Engine._take_wide)
WIDE_PREFILL_TOKENS = 64  # and a prefill run of this many tokens (rows x longest prompt)
WIDE_PROBE_EVERY = 32  # runs of one size between two probes of whether wide pays (WideChoice)
WIDE_MARGIN = 0.9  # a size goes wide when that took at most this x a one-slot run's time

Array = np.ndarray[Any, Any]


# --- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """One generated token and the text it completes ("" while a character is incomplete)."""

    token: int
    text: str


@dataclass(frozen=True, slots=True)
class Pieces:
    """Generated tokens taken together (a frame's), and the text they complete; as
    many (false) as there are tokens."""

    tokens: tuple[int, ...]
    text: str

    def __len__(self) -> int:
        return len(self.tokens)


class _Session:
    """One generation: its cache, tokens, and what its client has not taken yet."""

    def __init__(
        self,
        generator: TextGenerator,
        prompt: list[int],
        max_new: int,
        sampling: Sampling,
    ) -> None:
        layout = generator.layout
        self.generator = generator
        self.prompt = prompt
        self.max_new = max_new
        self.sampling = sampling
        self._rng: np.random.Generator | None = None  # made when first drawn from
        capacity = len(prompt) + max_new
        shape = (layout.layers, 2, layout.heads, capacity, layout.head_dim)
        self.cache: Array | None = np.zeros(shape, np.float32)
        self.length = 0  # tokens in the cache
        self.generated: list[int] = []
        # Decoding from `_prefix_at`, the text up to `_read_at` has been sent in pieces.
        self._prefix_at = 0
        self._read_at = 0
        self.queue: deque[int] = deque()  # tokens made, not taken by the client yet
        self.finish: str | None = None  # "eos" or "length" once it is done
        self.error: JobError | None = None
        # Its client waits on `changed` for `wanted` pieces (or the end); the idle
        # watch waits on `queued` for the first piece not taken.
        self.changed = trio.lowlevel.ParkingLot()
        self.queued = trio.lowlevel.ParkingLot()
        self.wanted = 1
        self.client_waiting = False  # for a fuller frame: the client is there, not idle
        # The client came back after its first piece (sent it): until then it makes
        # no more, leaving the CPU to that first frame.
        self.first_sent = False
        self.join_by = math.inf  # how long its engine may wait for it to join (`_Engine.run`)
        self.session: ort.InferenceSession | None = None
        self.wide: ort.InferenceSession | None = None  # for wide runs (_Engine._take_wide)
        self.waiting_since = trio.current_time()  # the oldest untaken piece's wait began

    @property
    def rng(self) -> np.random.Generator:
        """Its seeded generator (made when first needed: greedy sessions never draw)."""
        if self._rng is None:
            seed = self.sampling.seed
            self._rng = np.random.Generator(
                np.random.PCG64(seed if seed is not None else secrets.randbits(64))
            )
        return self._rng

    def choose(self, logits: Array) -> int:
        """The next token from its row of `logits`."""
        if self.sampling.temperature == 0:
            return int(np.argmax(logits))
        return choose_token(logits, self.sampling, self.rng)

    @property
    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    @property
    def ready(self) -> bool:
        """Whether the next decode step may run for it."""
        return (
            self.finish is None
            and self.error is None
            and self.cache is not None
            and len(self.queue) < BUFFERED_TOKENS
            and self.first_sent  # (see Generation.next_pieces)
        )

    @property
    def joining(self) -> bool:
        """Prefilled and in its engine, its first piece on its way to its client: it
        joins the decode steps once that is out."""
        return not self.first_sent and self.finish is None and self.error is None

    @property
    def awaiting_client(self) -> bool:
        """Whether it waits for its client: to take a piece, or to send its first."""
        return bool(self.queue) or (not self.first_sent and bool(self.generated))

    def take(self, token: int) -> None:
        """`token` was chosen: queue it for the client, or end the generation."""
        eos = token == self.generator.layout.eos_token_id
        if not eos:
            self.generated.append(token)
            if not self.queue or self.client_waiting:
                self.waiting_since = trio.current_time()
            if not self.queue:
                self.queued.unpark_all()
            self.queue.append(token)
        if eos:
            self.finish = "eos"
        elif len(self.generated) >= self.max_new:
            self.finish = "length"
        if self.finish is not None or len(self.queue) >= self.wanted:
            self.changed.unpark_all()  # (waking its client for less costs a task switch)

    def fail(self, error: JobError) -> None:
        self.error = error
        self.changed.unpark_all()
        self.queued.unpark_all()

    def text_until(self, end: int) -> str:
        """The text that the tokens up to `end` (of those generated) complete, past
        what was taken before. Byte-level tokens may end inside a character: its
        text waits (decoded as U+FFFD) for the bytes still to come.

        Only the last few tokens are decoded (as vLLM detokenizes): the text of
        the tokens since `_prefix_at`, against that of those already taken. Both
        start at the same token, so a decoder that treats a first token apart
        (dropping a leading space) treats both alike. Decoding every token from
        the first cost a step of 16 sessions more than its onnxruntime run; and
        the text is made only when the client takes the tokens, once for all
        those it takes together (a frame's), not once per token as they are made:
        two decodes per token were a tenth of a 16-row step."""
        decode, tokens = self.generator.tokenizer.decode, self.generated
        sent = decode(tokens[self._prefix_at : self._read_at])
        text = decode(tokens[self._prefix_at : end])
        if text.endswith("\ufffd") or not text.startswith(sent):
            return ""
        self._prefix_at, self._read_at = self._read_at, end
        return text[len(sent) :]

    def take_tokens(self, count: int) -> list[int]:
        """The first `count` tokens the client has not taken, now taken."""
        queue = self.queue
        taken = [queue.popleft() for _ in range(count)]
        self.waiting_since = trio.current_time()
        return taken

    @property
    def text(self) -> str:
        return self.generator.tokenizer.decode(self.generated)


class Generation:
    """A client's handle on its running session (see `Generations.open_session`)."""

    def __init__(
        self, session: _Session, on_taken: Callable[[], None], sharing: Callable[[], int]
    ) -> None:
        self._session = session
        self._on_taken = on_taken
        self._sharing = sharing
        self._first_taken = False

    async def next(self) -> Piece | None:
        """The next piece, or None when the generation is done. Raises its JobError."""
        s = self._session
        s.wanted = 1
        if self._first_taken and not s.first_sent:
            s.first_sent = True
            self._on_taken()  # its decode steps may start
        self._first_taken = True
        while not s.queue:
            if s.error is not None:
                raise s.error
            if s.finish is not None:
                return None
            await s.changed.park()
        end = len(s.generated) - len(s.queue) + 1
        (token,) = s.take_tokens(1)
        self._on_taken()
        return Piece(token, s.text_until(end))

    async def next_pieces(self) -> Pieces:
        """The pieces made and not taken yet: at least one, or none once the generation
        is done. Raises its JobError. The first piece comes alone, at once, and the
        session makes the next ones only once this is called again (the first frame
        is out): decode steps while the first frame went out, through a forwarding
        node too, took the cores it needed, and the time to first token rose by
        half. After it, while other sessions share its model's batches, it waits
        for `FRAME_TOKENS` of them: a frame costs the node far more than a row of a
        decode step, so a busy node sends fewer, fuller frames (vLLM's stream
        interval)."""
        s = self._session
        s.wanted = FRAME_TOKENS if self._first_taken and self._sharing() > 1 else 1
        if self._first_taken and not s.first_sent:
            s.first_sent = True
            self._on_taken()  # its decode steps may start
        self._first_taken = True
        s.client_waiting = True
        try:
            while len(s.queue) < s.wanted and s.finish is None and s.error is None:
                await s.changed.park()
        finally:
            s.client_waiting = False
        if not s.queue and s.error is not None:
            raise s.error
        return self.take_queued()

    def take_queued(self) -> Pieces:
        """The pieces made and not taken yet, without waiting (maybe none)."""
        s = self._session
        if not s.queue:
            return Pieces((), "")
        tokens = tuple(s.take_tokens(len(s.queue)))
        self._on_taken()
        return Pieces(tokens, s.text_until(len(s.generated)))

    @property
    def text(self) -> str:
        return self._session.text

    @property
    def tokens(self) -> int:
        return len(self._session.generated)

    @property
    def finish(self) -> str:
        return self._session.finish or "length"


# --- the engine: one per model -------------------------------------------------------------


class _Engine:
    """Runs the decode steps of one model's sessions, all of them in one batch per step
    (or, without `batch`, one session per step, in turn)."""

    def __init__(
        self,
        generator: TextGenerator,
        limiter: trio.CapacityLimiter,
        batch: bool,
        inline_below_ms: float = 0.0,
    ) -> None:
        self.generator = generator
        self.sessions: list[_Session] = []
        self._limiter = limiter
        self._inline_below_ms = inline_below_ms
        # The compute of the last decode step of each batch size, and of a prefill
        # per prompt token: what tells whether the next runs on the event loop's thread.
        self._step_ms: dict[int, float] = {}
        self._prefill_ms_per_token = math.inf
        self._prefills: list[_Prefill] = []  # prompts waiting for the prefill run
        self._prefill_lock = trio.Lock()
        self.prefill_runs = 0
        self._batch = batch
        self._wake = trio.Event()
        self._turn = 0
        self._kept: _KeptBatch | None = None
        # Sessions prefilled and not in `sessions` yet (their tasks add them), until when.
        self._arriving = 0
        self._arrive_by = -math.inf
        self.steps = 0
        self.batched_rows = 0
        self.rebuilds = 0  # steps whose batch was built from the sessions' caches
        self.narrowed = 0  # steps that took some rows of the last step's caches
        self.inline_steps = 0  # steps run on the event loop's thread
        self._wide_choices: dict[tuple[str, int], WideChoice] = {}  # by size class
        self.wide_steps = 0  # steps run with every worker slot's threads (_take_wide)
        self.wide_prefills = 0  # prefill runs run so
        self.run_ms = 0.0  # in onnxruntime's runs, prefills and steps (bench.text --parts engine)

    def wake(self) -> None:
        self._wake.set()

    def add(self, session: _Session) -> None:
        now = trio.current_time()
        session.join_by = now + JOIN_WAIT_S
        if self._arriving and now < self._arrive_by:
            self._arrive_by = now + JOIN_WAIT_S  # the next may come as long after
        self._arriving = max(0, self._arriving - 1)
        self.sessions.append(session)
        self.wake()

    def remove(self, session: _Session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)

    async def run(self) -> None:
        while True:
            ready = [s for s in self.sessions if s.ready]
            if not ready:
                self._drop_kept()  # its memory goes with the sessions
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if not self._batch:
                self._turn = (self._turn + 1) % len(ready)
                ready = [ready[self._turn]]
            elif await self._waited_for_joining():
                continue  # (who is ready again)
            await self._step(ready)

    async def _waited_for_joining(self) -> bool:
        """Wait, and say so, while sessions are about to join the batch: prefilled and
        not added yet, or added with their first piece on its way to their client.
        A prefill run's sessions are waited for at most JOIN_WAIT_S after the run,
        or after the last of them to come (so a large run's sessions, which take
        their tasks longer than that to add, still join at once: 64 took 5 ms to
        20 ms and joined over six steps, each building the batch again), and each
        one's first piece at most JOIN_WAIT_S after its `add`. A session that
        joins wakes the engine at once.

        Sessions prefilled together come to the engine one by one, as their tasks
        run, and join its steps as each one's first frame goes out. Stepping with
        those already in grew the batch over several steps, each building it
        again from every session's cache, and left the sessions that came late a
        few tokens behind, to finish in smaller steps of their own: 16 sessions of
        64 tokens started together took 73 steps, 9 of them rebuilt and 8
        narrowed. One session joining a running batch holds it up for as long as
        its first frame takes, about what building the batch again costs."""
        now = trio.current_time()
        if now >= self._arrive_by:
            self._arriving = 0  # (one cancelled between its prefill and `add`)
        joining = [s.join_by for s in self.sessions if s.joining and now < s.join_by]
        if self._arriving:
            joining.append(self._arrive_by)
        if not joining:
            return False
        self._wake = trio.Event()  # a session added, or its first frame out, wakes it
        with trio.move_on_at(max(joining)):
            await self._wake.wait()
        return True

    def _drop_kept(self) -> None:
        """Copy the kept batch's caches back into its sessions' own, and drop it."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.copy_back(self.generator.layout.layers)

    async def _step(self, batch: list[_Session]) -> None:
        """One token for each session of `batch`.

        The caches the model returned at the last step (the kept batch) are this
        step's inputs as they are when the batch is the same, or their rows when
        sessions left it; the sessions' own caches are brought up to date only
        when others join it (or it stops), and it is then built again from them.
        Copying each step's new keys and values into every session's cache cost
        about as much as a step's onnxruntime run at 16 sessions."""
        layout = self.generator.layout
        session = next(s.session for s in batch if s.session is not None)
        kept, self._kept = self._kept, None
        rows = kept.rows_of(batch) if kept is not None else None
        if kept is not None and rows is not None:
            past, mask = kept.past, kept.mask
            if rows != list(range(len(kept.rows))):  # sessions left (or paused)
                kept.copy_back(layout.layers, but=rows)  # the paused keep their caches
                past, mask = kept.take(rows)
                self.narrowed += 1
            mask = np.concatenate([mask, np.ones((len(batch), 1), np.int64)], axis=1)
            feeds = {
                "input_ids": np.array([[s.generated[-1]] for s in batch], np.int64),
                "attention_mask": mask,
                "position_ids": np.array([[s.length] for s in batch], np.int64),
                **past,
            }
        else:
            if kept is not None:
                kept.copy_back(layout.layers)
            feeds, _ = decode_feeds(batch, layout)
            self.rebuilds += 1
        # A step whose last run at this size was short runs inline. Steps follow
        # each other without a pause, and each one's hop to a worker thread and
        # back, with the wait for the busy event loop to take its result, cost
        # 0.3-0.4 ms: a quarter of the tokens/s at 16 sessions (bench.text). The
        # loop's other tasks run between steps, so an inline step holds them up
        # by at most STEP_INLINE_FACTOR x inline_below_ms. But not while a
        # session's first frame is on its way (a session is ready only once it
        # is out): its sending took a pass of the loop per step, and 16 sessions
        # prefilled together joined the batch over 8 ms instead of at once.
        limit = self._inline_below_ms * STEP_INLINE_FACTOR
        inline = self._step_ms.get(len(batch), math.inf) < limit and all(
            s.first_sent for s in self.sessions
        )
        wide = next((s.wide for s in batch if s.wide is not None), None)
        session, slots, choice = self._take_wide(
            "step", len(batch), WIDE_STEP_ROWS, session, wide, inline
        )
        self.wide_steps += bool(slots)
        try:
            logits, presents = await self.compute(session, feeds, inline)
        except JobError as error:
            for s in batch:
                s.fail(error)
            return
        finally:
            give_back(self._limiter, slots)
        if choice is not None:
            choice.ran(bool(slots), self._step_ms[len(batch)])
        self.steps += 1
        self.batched_rows += len(batch)
        names = past_names(layout.layers)
        self._kept = _KeptBatch(
            list(batch), dict(zip(names, presents, strict=True)), feeds["attention_mask"]
        )
        last = logits[:, -1]
        # One call for the rows that take the likeliest, as Python ints at once.
        greedy: list[int] = np.argmax(last, axis=-1).tolist()
        for row, s in enumerate(batch):
            s.length += 1  # (its cache is the kept batch's row until copied back)
            if s.cache is None or s.finish is not None:  # left while the step ran
                continue
            if s.sampling.temperature == 0:
                s.take(greedy[row])
            else:
                s.take(s.choose(last[row]))

    def _take_wide(
        self,
        kind: str,
        size: int,
        least: int,
        session: ort.InferenceSession,
        wide: ort.InferenceSession | None,
        inline: bool,
    ) -> tuple[ort.InferenceSession, list[object], WideChoice | None]:
        """The session a run of `size` (rows, or tokens) of `kind` goes on, the worker
        slots it took for it (`give_back`), and its size class's `WideChoice` (told
        how the run went, `ran`; None where it could not go wide).

        `wide` (the model's wide session, `LoadedModel.wide`, with the threads of
        every worker slot) for a run of `least` or more while every slot is free,
        where its class's choice says so (powers of two of `size`): it then takes
        all of them but the one a run in a worker thread takes itself (`_timed`).
        Else `session`, and no slot. Only when no other run is going: none waits
        for this one, nor it for one, and none starts while it uses every slot's
        threads."""
        limiter = self._limiter
        if wide is None or size < least or limiter.available_tokens < limiter.total_tokens:
            return session, [], None
        key = (kind, size.bit_length())
        choice = self._wide_choices.get(key)
        if choice is None:
            choice = self._wide_choices[key] = WideChoice()
        if not choice.wide():
            return session, [], choice
        return wide, take_free_slots(limiter, int(limiter.total_tokens) - (not inline)), choice

    async def prefill(
        self,
        session: ort.InferenceSession,
        prompt: list[int],
        wide: ort.InferenceSession | None = None,
    ) -> Step:
        """The logits and presents of `prompt`'s prefill ([1, ...] each, the presents
        `len(prompt)` long), run on `session`, or on `wide` (the model's wide
        session) where `_take_wide` says so for a run of WIDE_PREFILL_TOKENS or more.

        One prefill runs at a time. The prompts that come meanwhile wait, and
        the first of them to run takes all the others waiting into one run, left-
        padded and masked as decode steps are: 16 sessions that come at once
        cost two runs, not 16. A prompt that comes alone runs alone, unpadded."""
        ticket = _Prefill(prompt)
        self._prefills.append(ticket)
        try:
            async with self._prefill_lock:
                if ticket.out is None and ticket.error is None:
                    tickets, self._prefills = self._prefills, []
                    # Shielded: the prompts of others ride on this run (it is short).
                    with trio.CancelScope(shield=True):
                        await self._run_prefills(session, tickets, wide)
        finally:
            if ticket in self._prefills:  # cancelled while it waited
                self._prefills.remove(ticket)
        if ticket.error is not None:
            raise ticket.error
        assert ticket.out is not None
        return ticket.out

    async def _run_prefills(
        self,
        session: ort.InferenceSession,
        tickets: list[_Prefill],
        wide: ort.InferenceSession | None,
    ) -> None:
        """Prefill `tickets`' prompts in one run. It runs on the event loop's thread
        when it is small, and, while no other session runs, when it is up to
        IDLE_INLINE_FACTOR times that: then nothing waits for the loop but this
        session's first token, which the hop to a worker thread and back delayed
        by a few tenths of a millisecond."""
        layout = self.generator.layout
        feeds, longest = prefill_batch_feeds([t.prompt for t in tickets], layout)
        tokens = len(tickets) * longest
        estimate = self._prefill_ms_per_token * tokens
        limit = self._inline_below_ms * (1 if self.sessions else IDLE_INLINE_FACTOR)
        inline = estimate < limit
        session, slots, choice = self._take_wide(
            "prefill", tokens, WIDE_PREFILL_TOKENS, session, wide, inline
        )
        self.wide_prefills += bool(slots)
        try:
            (logits, presents), took = await self._timed(session, feeds, inline)
        except JobError as error:
            for ticket in tickets:
                ticket.error = error
            return
        finally:
            give_back(self._limiter, slots)
        if choice is not None:
            choice.ran(bool(slots), took / tokens)  # (per token: the pair's sizes differ)
        self._prefill_ms_per_token = took / tokens
        self.prefill_runs += 1
        self._arriving += len(tickets)  # each ticket's task adds its session
        self._arrive_by = trio.current_time() + JOIN_WAIT_S
        for row, ticket in enumerate(tickets):
            n = len(ticket.prompt)
            ticket.out = (
                logits[row : row + 1],
                [p[row : row + 1, :, longest - n :, :] for p in presents],
            )

    async def compute(
        self, session: ort.InferenceSession, feeds: dict[str, Array], inline: bool
    ) -> Step:
        """One decode step."""
        out, took = await self._timed(session, feeds, inline)
        self._step_ms[feeds["input_ids"].shape[0]] = took
        self.inline_steps += inline
        return out

    async def _timed(
        self, session: ort.InferenceSession, feeds: dict[str, Array], inline: bool
    ) -> tuple[Step, float]:
        """One run of the model and its compute in ms: on the event loop's own thread
        when `inline` (a small model, where the hop to a worker thread and back costs
        more than the run: `inline_below_ms`, as for the executor's requests), else
        in a worker thread."""
        layers = self.generator.layout.layers
        if not inline:
            out = await trio.to_thread.run_sync(
                _timed_step, session, feeds, layers, limiter=self._limiter
            )
        else:
            out = _timed_step(session, feeds, layers)
            await trio.lowlevel.checkpoint()  # the sessions' senders go between steps
        self.run_ms += out[1]
        return out


Step = tuple[Array, list[Array]]


class WideChoice:
    """Whether the runs of one size class go on the wide session: measured, since
    whether more threads pay depends on the run's size and on the machine. On
    one 2-core VM, a step of 16 rows took 0.72 to 0.81 of one thread's time on
    two threads one day, and 0.97 to 1.14 another (docs/design.md).

    Every WIDE_PROBE_EVERY runs, a probe: the next two runs go one wide and one
    not, one after the other (their sizes all but the same), and the ratio of
    their times moves the class's ratio halfway to it. Between probes, runs go
    wide while that ratio is at most WIDE_MARGIN: a wide run keeps every core
    busy, so a tie goes to the one slot. The first runs of a class are a probe,
    wide first."""

    __slots__ = ("_half", "_left", "ratio")

    def __init__(self) -> None:
        self.ratio: float | None = None  # wide's time / one slot's, a running mean
        self._left = 0  # runs until the next probe
        self._half: tuple[bool, float] | None = None  # a probe's first run: (wide, ms)

    def wide(self) -> bool:
        """Whether the next run goes wide."""
        if self._half is not None:
            return not self._half[0]  # the probe's other run
        if self._left <= 0:
            return True
        return self.ratio is not None and self.ratio <= WIDE_MARGIN

    def ran(self, wide: bool, ms: float) -> None:
        """A run of this class went wide (or not) and took `ms` (per unit of its size,
        where the runs of a class differ much in size)."""
        half = self._half
        if half is None and self._left > 0:
            self._left -= 1
            return
        if half is None or half[0] == wide:  # a probe starts (or starts again)
            self._half = (wide, ms)
            return
        self._half = None
        wide_ms, narrow_ms = (ms, half[1]) if wide else (half[1], ms)
        ratio = wide_ms / max(narrow_ms, 1e-9)
        self.ratio = ratio if self.ratio is None else (self.ratio + ratio) / 2
        self._left = WIDE_PROBE_EVERY


@dataclass(slots=True, eq=False)
class _Prefill:
    """A prompt waiting for its prefill, and then its logits and presents (or error)."""

    prompt: list[int]
    out: Step | None = None
    error: JobError | None = None


@dataclass(frozen=True, slots=True)
class _KeptBatch:
    """The sessions of the last decode step, in row order, with the caches the model
    returned for them (left-padded: a row's cache is its last `length` positions)
    and their attention mask (the new token's column not yet added)."""

    rows: list[_Session]
    past: dict[str, Array]
    mask: Array

    def rows_of(self, batch: list[_Session]) -> list[int] | None:
        """The rows of `batch`'s sessions, in order, if all of them are here."""
        where = {id(s): row for row, s in enumerate(self.rows)}
        rows = [where.get(id(s), -1) for s in batch]
        return None if -1 in rows else rows

    def take(self, rows: list[int]) -> tuple[dict[str, Array], Array]:
        """The caches and mask of `rows` only, without the padding none of them needs."""
        mask = self.mask[rows]
        width = mask.shape[1]
        start = width - max(self.rows[row].length for row in rows)
        past = {name: value[rows, :, start:, :] for name, value in self.past.items()}
        return past, mask[:, start:]

    def copy_back(self, layers: int, but: Sequence[int] = ()) -> None:
        """Bring each live session's own cache up to date from its row (but `but`'s)."""
        names = past_names(layers)
        for row, s in enumerate(self.rows):
            if s.cache is None or s.finish is not None or row in but:
                continue
            n = s.length
            for i in range(layers):
                for kv in range(2):
                    s.cache[i, kv, :, :n, :] = self.past[names[2 * i + kv]][row, :, -n:, :]


def decode_feeds(batch: Sequence[_Session], layout: DecoderLayout) -> tuple[dict[str, Array], int]:
    """One decode step's inputs for `batch`: each session's last token at its own
    position, its cache left-padded to the longest, the padding masked off. Also
    returns the longest cache's length: the new token's index in the outputs."""
    longest = max(s.length for s in batch)
    rows = len(batch)
    past = np.zeros((layout.layers, 2, rows, layout.heads, longest, layout.head_dim), np.float32)
    mask: Array = np.zeros((rows, longest + 1), np.int64)
    for row, s in enumerate(batch):
        assert s.cache is not None
        past[:, :, row, :, longest - s.length :, :] = s.cache[:, :, :, : s.length, :]
        mask[row, longest - s.length :] = 1
    feeds = {
        "input_ids": np.array([[s.generated[-1]] for s in batch], np.int64),
        "attention_mask": mask,
        "position_ids": np.array([[s.length] for s in batch], np.int64),
    }
    # [layers, 2, ...] as [layers x 2, ...]: each layer's key, then its value
    feeds.update(zip(past_names(layout.layers), past.reshape(-1, *past.shape[2:]), strict=True))
    return feeds, longest


def prefill_batch_feeds(
    prompts: Sequence[Sequence[int]], layout: DecoderLayout
) -> tuple[dict[str, Array], int]:
    """One prefill run's inputs for `prompts`, and the longest's length: each prompt
    left-padded to the longest, the padding masked off, positions counted from
    each prompt's first token. One prompt is not padded (`prefill_feeds`)."""
    if len(prompts) == 1:
        return prefill_feeds(prompts[0], layout), len(prompts[0])
    longest = max(len(p) for p in prompts)
    ids: Array = np.zeros((len(prompts), longest), np.int64)
    mask: Array = np.zeros((len(prompts), longest), np.int64)
    positions: Array = np.zeros((len(prompts), longest), np.int64)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        ids[row, longest - n :] = prompt
        mask[row, longest - n :] = 1
        positions[row, longest - n :] = np.arange(n)
    empty = np.zeros((len(prompts), layout.heads, 0, layout.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name in past_names(layout.layers):
        feeds[name] = empty
    return feeds, longest


def prefill_feeds(prompt: Sequence[int], layout: DecoderLayout) -> dict[str, Array]:
    n = len(prompt)
    empty = np.zeros((1, layout.heads, 0, layout.head_dim), np.float32)
    feeds: dict[str, Array] = {
        "input_ids": np.array([prompt], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None, :],
    }
    for name in past_names(layout.layers):
        feeds[name] = empty
    return feeds


def _timed_step(
    session: ort.InferenceSession, feeds: dict[str, Array], layers: int
) -> tuple[Step, float]:
    started = time.perf_counter()
    out = _run_step(session, feeds, layers)
    return out, (time.perf_counter() - started) * 1e3


def _run_step(
    session: ort.InferenceSession, feeds: dict[str, Array], layers: int
) -> tuple[Array, list[Array]]:
    """In a worker thread: the logits, and every layer's present key and value, in
    that order ([batch, heads, total, head_dim] each)."""
    try:
        values = session.run(step_outputs(layers), feeds)
    except Exception as error:  # onnxruntime's pybind errors share no useful base
        raise JobError(
            ErrorCode.INTERNAL, f"decoder step failed: {type(error).__name__}: {error}"
        ) from None
    return values[0], values[1:]


# --- the node's generations ----------------------------------------------------------------


class Generations:
    """The generation sessions of one node, within its limits and memory budget."""

    def __init__(
        self, executor: Executor, cards: Sequence[ModelCard], config: ExecutorConfig
    ) -> None:
        self._executor = executor
        self._config = config
        self._engines: dict[str, _Engine] = {}
        self._nursery: trio.Nursery | None = None  # where engines run, once `run` does
        for card in cards:
            self.add(card)
        self._sessions: set[_Session] = set()
        # The caches count against the model memory budget, also when a model loads.
        executor.models.held_bytes = lambda: self.cache_bytes
        # Sessions started, refused at the start, and ended: all their tokens taken,
        # failed (an error, idle too long), or left before the end (a hang-up).
        self.started = 0
        self.refused = 0
        self.finished = 0
        self.failed = 0
        self.cancelled = 0
        self._ended = trio.lowlevel.ParkingLot()

    def add(self, card: ModelCard) -> None:
        """Generate with `card`'s model, if it is a generator (also one fetched after start)."""
        generator = load_text_generator(card)
        if generator is not None:
            config = self._config
            engine = _Engine(
                generator, self._executor.limiter, config.batch_decode, config.inline_below_ms
            )
            self._engines[card.id] = engine
            if self._nursery is not None:
                self._nursery.start_soon(engine.run)

    @property
    def model_ids(self) -> list[str]:
        return sorted(self._engines)

    @property
    def sessions(self) -> int:
        """Generations running now."""
        return len(self._sessions)

    @property
    def cache_bytes(self) -> int:
        """The KV cache memory the running generations hold."""
        return sum(s.nbytes for s in self._sessions)

    async def wait_until(self, predicate: Callable[[Generations], bool]) -> None:
        """Until `predicate(self)` holds, checked as sessions end (tests use it)."""
        while not predicate(self):
            await self._ended.park()

    def engine(self, model_id: str) -> _Engine:
        return self._engines[model_id]

    async def run(self) -> None:
        """Run every model's engine (those added later too) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for engine in self._engines.values():
                nursery.start_soon(engine.run)
            await trio.sleep_forever()

    @asynccontextmanager
    async def open_session(
        self, model_id: str, prompt: str, max_tokens: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        """A generation of up to `max_tokens` tokens after `prompt`, prefilled and
        running in its model's engine; leaving the context ends it and frees its cache.
        Raises JobError: UNKNOWN_MODEL, INVALID_INPUT (a bad prompt, too many tokens),
        OVERLOADED (sessions or memory full), DEADLINE_EXCEEDED (idle too long)."""
        engine = self._engine_for(model_id)
        generator = engine.generator
        prompt_ids = self._tokenize(generator, prompt, max_tokens)
        max_new = min(max_tokens, generator.layout.max_tokens - len(prompt_ids))
        self._admit(generator, len(prompt_ids) + max_new)
        session = _Session(generator, prompt_ids, max_new, sampling)
        self._sessions.add(session)
        self.started += 1
        idle = False
        try:
            async with self._executor.models.use(model_id) as loaded, trio.open_nursery() as n:
                session.session, session.wide = loaded.session, loaded.wide
                n.start_soon(self._end_when_idle, session, n.cancel_scope)
                await self._prefill(session)
                engine.add(session)
                yield Generation(session, engine.wake, lambda: len(engine.sessions))
                n.cancel_scope.cancel()
            idle = n.cancel_scope.cancelled_caught and session.error is not None
        finally:
            engine.remove(session)
            self._sessions.discard(session)
            session.cache = None
            if session.error is not None:
                self.failed += 1
            elif session.finish is not None and not session.queue:
                self.finished += 1
            else:
                self.cancelled += 1
            self._ended.unpark_all()
        if idle:
            assert session.error is not None
            raise session.error

    async def complete(self, model_id: str, prompts: Sequence[str]) -> list[tuple[str, int]]:
        """The greedy completion of each prompt, and its count of tokens, to its end: the
        end of text, the model's window or `max_new_tokens`. The prompts run at once,
        sharing their decode steps. Raises JobError as `open_session` does, and
        INVALID_INPUT for no prompt or more than `max_sessions`."""
        limit = self._config.max_sessions
        if not prompts or len(prompts) > limit:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"{len(prompts)} prompts for {model_id}: a generation job takes 1 to {limit} "
                "(max_sessions, --max-sessions)",
            )
        self._engine_for(model_id)  # before any session: UNKNOWN_MODEL or not a generator
        done: list[tuple[str, int]] = [("", 0)] * len(prompts)
        failed: list[JobError] = []

        async def one(i: int, stop: trio.CancelScope) -> None:
            try:
                async with self.open_session(
                    model_id, prompts[i], self._config.max_new_tokens, Sampling()
                ) as generation:
                    while await generation.next_pieces():
                        pass
                    done[i] = (generation.text, generation.tokens)
            except JobError as error:  # the first ends them all
                failed.append(error)
                stop.cancel()

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i, nursery.cancel_scope)
        if failed:
            raise failed[0]
        return done

    def _engine_for(self, model_id: str) -> _Engine:
        engine = self._engines.get(model_id)
        if engine is not None:
            return engine
        if model_id in self._executor.models:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model_id} is not a text generator; this node generates with "
                f"{self.model_ids or 'none'}",
            )
        raise JobError(
            ErrorCode.UNKNOWN_MODEL,
            f"this node does not serve model {model_id!r}; it generates with "
            f"{self.model_ids or 'none'}",
        )

    def _tokenize(self, generator: TextGenerator, prompt: str, max_tokens: int) -> list[int]:
        layout, limit = generator.layout, self._config.max_new_tokens
        if max_tokens > limit:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"{max_tokens} new tokens asked; this node generates at most {limit} per "
                "request (max_new_tokens, --max-new-tokens)",
            )
        ids: list[int] = generator.tokenizer.encode(prompt).ids
        if not ids:
            raise JobError(ErrorCode.INVALID_INPUT, "the prompt is empty: it has no tokens")
        if len(ids) >= layout.max_tokens:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"the prompt has {len(ids)} tokens; model {generator.model_id} takes at most "
                f"{layout.max_tokens - 1} to leave room for one new token",
            )
        if max(ids) >= layout.vocab_size:
            raise JobError(
                ErrorCode.INTERNAL, f"model {generator.model_id}: tokenizer and model disagree"
            )
        return ids

    def _admit(self, generator: TextGenerator, tokens: int) -> None:
        """OVERLOADED unless one more session, and its cache, fit this node's limits."""
        limit = self._config.max_sessions
        if len(self._sessions) >= limit:
            self.refused += 1
            raise JobError(
                ErrorCode.OVERLOADED,
                f"{len(self._sessions)} generations running, this node's limit "
                "(max_sessions, --max-sessions); try again shortly",
            )
        need = tokens * generator.layout.bytes_per_token
        try:  # idle models make room for the cache, as they do for a model loaded on demand
            self._executor.models.make_room(
                need, f"a generation of {tokens} tokens' KV cache", keep=generator.model_id
            )
        except JobError:
            self.refused += 1
            raise

    async def _prefill(self, s: _Session) -> None:
        assert s.session is not None and s.cache is not None
        layout = s.generator.layout
        try:
            logits, presents = await self._engines[s.generator.model_id].prefill(
                s.session, s.prompt, s.wide
            )
        except JobError as error:
            s.fail(error)
            raise
        n = len(s.prompt)
        for i in range(layout.layers):  # (no stacked copy of all layers first)
            for kv in range(2):
                s.cache[i, kv, :, :n, :] = presents[2 * i + kv][0]
        s.length = n
        s.take(s.choose(logits[0, -1]))

    async def _end_when_idle(self, s: _Session, scope: trio.CancelScope) -> None:
        """End `s` when its client has left a piece untaken for `session_idle_s`."""
        idle_s = self._config.session_idle_s
        while True:
            if not s.awaiting_client:
                await s.queued.park()
                continue
            if trio.current_time() < s.waiting_since + idle_s:
                await trio.sleep_until(s.waiting_since + idle_s)
                continue
            s.fail(
                JobError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"the generation's client took no token for {idle_s:g} s "
                    "(session_idle_s, --session-idle-s)",
                )
            )
            s.cache = None
            scope.cancel()
            return
