"""Generation sessions on one node, without a network: the tokens a session gives
against a direct onnxruntime loop, continuous batching against sessions alone,
sampling with a seed, the limits, and the cache memory after each way a session ends."""

from __future__ import annotations

import gc
import shutil
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import trio
from tiny_decoder import EOS, HEAD_DIM, HEADS, LAYERS, MODEL_ID, tiny_tokenizer

from p2p_node import _generation as generation_module
from p2p_node._config import ExecutorConfig
from p2p_node._decoder import Sampling, choose_token
from p2p_node._executor import Executor, load_model
from p2p_node._generation import FRAME_TOKENS, Generations
from p2p_node._repository import bundled_models_dir, read_repository
from scheduler import ErrorCode, JobError

GREEDY = Sampling()
PROMPTS = ["Hello world", "The quick brown fox", "a", "def f(x):\n    return x"]


def reference_tokens(model_dir: Path, prompt: str, max_new: int) -> list[int]:
    """Greedy tokens by a plain prefill-and-decode loop on onnxruntime, one at a time."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    ids = tiny_tokenizer().encode(prompt).ids
    past = {
        f"past_key_values.{i}.{kv}": np.zeros((1, HEADS, 0, HEAD_DIM), np.float32)
        for i in range(LAYERS)
        for kv in ("key", "value")
    }
    feeds = {
        "input_ids": np.array([ids]),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids))[None],
    }
    out: list[int] = []
    total = len(ids)
    while True:
        values = session.run(None, {**feeds, **past})
        token = int(np.argmax(values[0][0, -1]))
        if token == EOS:
            return out
        out.append(token)
        if len(out) == max_new:
            return out
        past = {
            f"past_key_values.{i}.{kv}": values[1 + 2 * i + j]
            for i in range(LAYERS)
            for j, kv in enumerate(("key", "value"))
        }
        total += 1
        feeds = {
            "input_ids": np.array([[token]]),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.array([[total - 1]]),
        }


@asynccontextmanager
async def generations(models_dir: Path, **config: object) -> AsyncIterator[Generations]:
    executor_config = ExecutorConfig(**config)  # type: ignore[arg-type]
    cards = read_repository(models_dir)
    executor = Executor.from_cards(cards, executor_config)
    service = Generations(executor, cards, executor_config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def generate(
    service: Generations, prompt: str, max_tokens: int, sampling: Sampling = GREEDY
) -> list[int]:
    tokens = []
    async with service.open_session(MODEL_ID, prompt, max_tokens, sampling) as generation:
        while (piece := await generation.next()) is not None:
            tokens.append(piece.token)
    return tokens


async def test_a_session_gives_the_tokens_of_a_plain_decode_loop(tiny_models: Path) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            for prompt in PROMPTS:
                got = await generate(service, prompt, 40)
                assert got == reference_tokens(tiny_models / MODEL_ID, prompt, 40)
            assert service.cache_bytes == 0 and service.sessions == 0


async def test_the_pieces_add_up_to_the_text(tiny_models: Path) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            async with service.open_session(MODEL_ID, "Hello", 30, Sampling()) as generation:
                pieces = []
                while (piece := await generation.next()) is not None:
                    pieces.append(piece.text)
                text = generation.text
    assert text == tiny_tokenizer().decode(reference_tokens(tiny_models / MODEL_ID, "Hello", 30))
    assert text.startswith("".join(pieces))


async def test_continuous_batching_gives_the_tokens_of_sessions_run_alone(
    tiny_models: Path,
) -> None:
    samplings = [Sampling(), Sampling(0.8, 20, 0.9, seed=7), Sampling(1.5, seed=3), Sampling()]
    with trio.fail_after(60):
        async with generations(tiny_models, batch_decode=False) as alone:
            expected = [
                await generate(alone, p, 30, s) for p, s in zip(PROMPTS, samplings, strict=True)
            ]
        async with generations(tiny_models) as batched:
            got: list[list[int]] = [[] for _ in PROMPTS]

            async def one(i: int) -> None:
                got[i] = await generate(batched, PROMPTS[i], 30, samplings[i])

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            engine = batched.engine(MODEL_ID)
            assert batched.cache_bytes == 0
    assert got == expected
    assert engine.batched_rows > engine.steps  # some steps ran several sessions at once
    assert engine.rebuilds < engine.steps  # some fed the last step's caches back as they were
    assert engine.prefill_runs < len(PROMPTS)  # prompts of different lengths shared a run


async def test_sessions_that_start_together_step_together_from_their_first_step(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions prefilled in one run come to the engine one by one, and join its
    steps as each one's first piece is taken; the engine waits for them, so that
    every step runs all of them: the batch is built once, then fed its own
    caches, and none falls behind to finish alone. (JOIN_WAIT_S, the most it
    waits, is raised here: a stalled machine must not change what is checked.)"""
    monkeypatch.setattr(generation_module, "JOIN_WAIT_S", 60.0)
    max_new = 12
    for prompt in PROMPTS:  # none ends before max_new: every step has them all
        assert len(reference_tokens(tiny_models / MODEL_ID, prompt, max_new)) == max_new
    with trio.fail_after(30):
        async with generations(tiny_models, max_new_tokens=max_new) as service:
            done = await service.complete(MODEL_ID, PROMPTS)
            engine = service.engine(MODEL_ID)
            assert service.cache_bytes == 0
    assert [tokens for _, tokens in done] == [max_new] * len(PROMPTS)
    assert engine.prefill_runs == 1
    assert engine.steps == max_new - 1  # the prefill made each one's first token
    assert engine.batched_rows == len(PROMPTS) * engine.steps
    assert (engine.rebuilds, engine.narrowed) == (1, 0)


async def test_runs_of_many_rows_go_wide_and_give_the_tokens_of_one_thread(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two worker slots, a generator has a wide session too (both slots'
    threads), and a step of WIDE_STEP_ROWS rows or more, or a prefill run of
    WIDE_PREFILL_TOKENS, with no other run going, may run on it (the first runs
    of a size are a probe, wide first): the same tokens as on one thread, and as
    a plain decode loop."""
    monkeypatch.setattr(generation_module, "WIDE_STEP_ROWS", 2)
    monkeypatch.setattr(generation_module, "WIDE_PREFILL_TOKENS", 2)
    max_new = 12
    with trio.fail_after(60):
        async with generations(tiny_models, workers=1, max_new_tokens=max_new) as narrow:
            expected = await narrow.complete(MODEL_ID, PROMPTS)
            engine = narrow.engine(MODEL_ID)
            assert engine.wide_steps == engine.wide_prefills == 0  # one slot: no wide session
        async with generations(tiny_models, workers=2, max_new_tokens=max_new) as service:
            got = await service.complete(MODEL_ID, PROMPTS)
            engine = service.engine(MODEL_ID)
    assert got == expected
    decode = tiny_tokenizer().decode
    assert [text for text, _ in got] == [
        decode(reference_tokens(tiny_models / MODEL_ID, p, max_new)) for p in PROMPTS
    ]
    assert engine.wide_steps > 0 and engine.wide_prefills > 0


def test_a_size_goes_wide_while_its_probes_find_wide_the_faster_by_the_margin() -> None:
    """The first two runs of a size class are a probe, one each way; the runs
    after it go as it found, until the next probe WIDE_PROBE_EVERY runs later,
    which can turn the choice; a tie goes to the one slot."""
    every = generation_module.WIDE_PROBE_EVERY
    choice = generation_module.WideChoice()

    def run(ms_wide: float, ms_narrow: float) -> bool:
        wide = choice.wide()
        choice.ran(wide, ms_wide if wide else ms_narrow)
        return wide

    assert [run(1.0, 2.0), run(1.0, 2.0)] == [True, False]  # the probe
    assert choice.ratio == 0.5
    assert all(run(1.0, 2.0) for _ in range(every))  # wide the faster
    assert [run(3.0, 2.0), run(3.0, 2.0)] == [True, False]  # the next probe
    assert choice.ratio == 1.0  # the mean of its probes: 0.5 and 1.5
    assert not any(run(3.0, 2.0) for _ in range(every))  # a tie: the one slot
    assert [run(3.0, 2.0), run(3.0, 2.0)] == [True, False]
    assert choice.ratio == 1.25
    assert not any(run(3.0, 2.0) for _ in range(every))


def test_a_probe_pairs_two_runs_of_either_way_and_its_first_run_may_be_either() -> None:
    """A probe's run that could not go as it asked (a slot was busy) starts it
    again: only a pair of runs one each way is compared."""
    choice = generation_module.WideChoice()
    assert choice.wide()
    choice.ran(False, 2.0)  # asked wide, ran on one slot
    assert choice.wide()  # the pair's other run
    choice.ran(False, 2.5)  # again one slot: the probe starts again from this one
    assert choice.ratio is None and choice.wide()
    choice.ran(True, 1.0)
    assert choice.ratio == 1.0 / 2.5
    assert choice.wide()


def test_only_a_batching_generator_on_several_worker_slots_gets_a_wide_session(
    tiny_models: Path,
) -> None:
    (card,) = read_repository(tiny_models)
    loaded = load_model(card, ExecutorConfig(workers=2, intra_op_threads=2))
    assert loaded.wide is not None
    assert loaded.wide.get_session_options().intra_op_num_threads == 4
    stop = "session.force_spinning_stop"  # its threads sleep once a run ends
    assert loaded.wide.get_session_options().get_session_config_entry(stop) == "1"
    assert loaded.session.get_session_options().intra_op_num_threads == 2
    assert loaded.memory_bytes == 2 * card.memory_bytes  # two of the model, in the budget
    too_small = 1.5 * card.memory_bytes / (1 << 20)  # room for one of it, not two
    for config in (
        ExecutorConfig(workers=1),
        ExecutorConfig(batch_decode=False),
        ExecutorConfig(model_memory_mb=too_small),
    ):
        assert load_model(card, config).wide is None
    (digits,) = read_repository(bundled_models_dir(), frozenset({"digits-mlp"}))
    assert load_model(digits, ExecutorConfig(workers=2)).wide is None  # no generator


async def test_a_wide_session_unloads_and_loads_again_with_its_model(tiny_models: Path) -> None:
    (card,) = read_repository(tiny_models)
    budget = 2.5 * card.memory_bytes / (1 << 20)
    executor = Executor.from_cards([card], ExecutorConfig(workers=2, model_memory_mb=budget))
    models = executor.models
    assert models.used_bytes == 2 * card.memory_bytes
    held = models.hold(MODEL_ID)
    assert held is not None and held.wide is not None
    wide = weakref.ref(held.wide)
    models.release(MODEL_ID)
    del held
    models.make_room(models.budget_bytes or 0, "a test")  # unloads it, both sessions
    assert (models.is_loaded(MODEL_ID), models.used_bytes) == (False, 0)
    gc.collect()
    assert wide() is None  # its memory is freed
    with trio.fail_after(30):
        async with models.use(MODEL_ID) as loaded:
            assert loaded.wide is not None
    assert models.used_bytes == 2 * card.memory_bytes


async def test_a_run_goes_wide_only_while_no_other_run_holds_a_worker_slot(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation_module, "WIDE_STEP_ROWS", 2)
    monkeypatch.setattr(generation_module, "WIDE_PREFILL_TOKENS", 2)
    config = ExecutorConfig(workers=2, max_new_tokens=12)
    cards = read_repository(tiny_models)
    executor = Executor.from_cards(cards, config)
    service = Generations(executor, cards, config)
    busy = object()  # a job's run, holding one of the two slots
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            engine = service.engine(MODEL_ID)
            executor.limiter.acquire_on_behalf_of_nowait(busy)
            held = await service.complete(MODEL_ID, PROMPTS)
            assert (engine.wide_steps, engine.wide_prefills) == (0, 0)
            assert executor.limiter.borrowed_tokens == 1
            executor.limiter.release_on_behalf_of(busy)
            free = await service.complete(MODEL_ID, PROMPTS)
            assert engine.wide_steps > 0 and engine.wide_prefills > 0
            assert executor.limiter.borrowed_tokens == 0  # every slot a wide run took is back
            nursery.cancel_scope.cancel()
    assert held == free


async def test_sessions_prefilled_together_that_arrive_slowly_still_step_together(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine waits for each session of a prefill run up to JOIN_WAIT_S after the
    one before it, not after the run: 64 sessions took longer than that to come
    in, and the batch grew over six steps, each built again. Here each comes
    0.6 JOIN_WAIT_S after the one before, the last 1.8 JOIN_WAIT_S after the
    run (a waiting window counted from the run had closed on two of them)."""
    wait = 2.0
    monkeypatch.setattr(generation_module, "JOIN_WAIT_S", wait)
    prompts = PROMPTS[:4]
    max_new = 6
    for prompt in prompts:
        assert len(reference_tokens(tiny_models / MODEL_ID, prompt, max_new)) == max_new
    prefill = Generations._prefill
    order = iter(range(len(prompts)))

    async def slow_to_arrive(self: Generations, session: Any) -> None:
        await prefill(self, session)
        await trio.sleep(next(order) * 0.6 * wait)  # then open_session adds it

    monkeypatch.setattr(Generations, "_prefill", slow_to_arrive)
    with trio.fail_after(30):
        async with generations(tiny_models, max_new_tokens=max_new) as service:
            done = await service.complete(MODEL_ID, prompts)
            engine = service.engine(MODEL_ID)
    assert [tokens for _, tokens in done] == [max_new] * len(prompts)
    assert engine.prefill_runs == 1
    assert engine.steps == max_new - 1
    assert engine.batched_rows == len(prompts) * engine.steps
    assert (engine.rebuilds, engine.narrowed) == (1, 0)


async def test_a_session_whose_first_frame_never_goes_out_holds_the_batch_up_once(
    tiny_models: Path,
) -> None:
    """The engine waits for a joining session at most JOIN_WAIT_S: a client that
    never comes back for its second piece does not stop the other sessions."""
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            async with service.open_session(MODEL_ID, PROMPTS[0], 40, GREEDY) as stuck:
                assert await stuck.next() is not None  # and never again
                got = await generate(service, PROMPTS[1], 40)
    assert got == reference_tokens(tiny_models / MODEL_ID, PROMPTS[1], 40)


async def test_sessions_that_pause_or_leave_the_batch_still_give_their_own_tokens(
    tiny_models: Path,
) -> None:
    """A client that stops reading pauses its session out of the batches, one that
    hangs up leaves them; the others go on with their rows of the last step's
    caches, and the paused one, back, with its own cache: every session gives
    the tokens it gives alone."""
    with trio.fail_after(60):
        async with generations(tiny_models, batch_decode=False) as alone:
            expected = [await generate(alone, p, 40) for p in PROMPTS]
        assert len(expected[0]) > 1 + generation_module.BUFFERED_TOKENS  # it must pause
        async with generations(tiny_models) as batched:
            engine = batched.engine(MODEL_ID)
            got: list[list[int]] = [[] for _ in PROMPTS]
            others_done = trio.Event()
            finished = 0

            async def one(i: int) -> None:
                nonlocal finished
                async with batched.open_session(MODEL_ID, PROMPTS[i], 40, GREEDY) as generation:
                    while (piece := await generation.next()) is not None:
                        got[i].append(piece.token)
                        if i == 0 and len(got[0]) == 1:
                            await others_done.wait()  # meanwhile its queue fills: it pauses
                        if i == 1 and len(got[1]) == 5:
                            break  # hangs up
                if i > 0:
                    finished += 1
                    if finished == len(PROMPTS) - 1:
                        others_done.set()

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            assert batched.cache_bytes == 0
    assert got[0] == expected[0] and got[2:] == expected[2:]
    assert got[1] == expected[1][:5]
    assert engine.narrowed > 0  # some steps went on with rows of the last step's caches


async def test_steps_run_on_the_loops_thread_but_not_while_a_first_frame_is_on_its_way(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step runs inline once a step of its size is known to be short; but
    while a session that joined has its first frame on its way, the others' steps
    run in a worker thread, leaving the event loop to send it."""
    lengths = {p: len(reference_tokens(tiny_models / MODEL_ID, p, 40)) for p in PROMPTS}
    prompt = max(PROMPTS, key=lengths.__getitem__)
    paused_at = 2 + generation_module.BUFFERED_TOKENS  # its client takes 2, then stops
    assert lengths[prompt] > paused_at + 1  # it has steps to run after the pause
    steps: list[tuple[bool, bool]] = []  # each step: inline, a first frame on its way
    compute = generation_module._Engine.compute
    stepped = trio.lowlevel.ParkingLot()

    async def recorded(self: Any, session: Any, feeds: Any, inline: bool) -> Any:
        steps.append((inline, not all(s.first_sent for s in self.sessions)))
        stepped.unpark_all()
        return await compute(self, session, feeds, inline)

    monkeypatch.setattr(generation_module._Engine, "compute", recorded)
    got: list[int] = []
    go_on = trio.Event()

    async def read_first(generation: Any) -> None:
        while (piece := await generation.next()) is not None:
            got.append(piece.token)
            if len(got) == 2:
                await go_on.wait()

    with trio.fail_after(60):
        async with generations(tiny_models, inline_below_ms=1000.0) as service:
            async with (
                service.open_session(MODEL_ID, prompt, 40, GREEDY) as first,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(read_first, first)
                while len(steps) < paused_at - 1:  # its tokens but the prefill's
                    await stepped.park()
                async with service.open_session(MODEL_ID, PROMPTS[0], 40, GREEDY) as second:
                    assert await second.next() is not None  # its first frame is on its way
                    joined = len(steps)
                    go_on.set()  # the first session's steps go on meanwhile
                    while len(steps) == joined:
                        await stepped.park()
                    while await second.next() is not None:  # (its first frame is out)
                        pass
            assert service.cache_bytes == 0
    assert got == reference_tokens(tiny_models / MODEL_ID, prompt, 40)
    assert steps[:joined] == [(False, False)] + [(True, False)] * (joined - 1)
    assert not any(inline and pending for inline, pending in steps)
    assert (False, True) in steps[joined:]  # stepped in a thread while it was on its way
    assert (True, False) in steps[joined:]  # and inline again once it was out


async def test_sessions_sharing_batches_take_their_pieces_in_fuller_frames(
    tiny_models: Path,
) -> None:
    # Per session, each frame: its pieces, and whether other sessions shared the
    # batches when its client asked for it.
    frames: dict[int, list[tuple[int, bool]]] = {}

    async def one(i: int, ready: trio.Event | None, go: trio.Event) -> None:
        async with batched.open_session(MODEL_ID, PROMPTS[0], 40, GREEDY) as generation:
            if ready is not None:
                ready.set()
            await go.wait()
            got = frames[i] = []
            while True:
                shared = len(batched.engine(MODEL_ID).sessions) > 1
                if not (pieces := await generation.next_pieces()):
                    break
                got.append((len(pieces), shared))

    with trio.fail_after(60):
        async with generations(tiny_models) as batched:
            async with trio.open_nursery() as nursery:  # alone: each piece as it comes
                alone = trio.Event()
                nursery.start_soon(one, 0, None, alone)
                alone.set()
            assert batched.sessions == 0
            async with trio.open_nursery() as nursery:  # two share the batches
                go, started = trio.Event(), [trio.Event(), trio.Event()]
                for i in (1, 2):
                    nursery.start_soon(one, i, started[i - 1], go)
                for event in started:
                    await event.wait()
                go.set()
            assert batched.cache_bytes == 0
    expected = len(reference_tokens(tiny_models / MODEL_ID, PROMPTS[0], 40))
    assert expected > 2 * FRAME_TOKENS
    assert {i: sum(n for n, _ in got) for i, got in frames.items()} == dict.fromkeys(
        frames, expected
    )
    assert min(n for n, _ in frames[0]) < FRAME_TOKENS  # alone: no wait for more pieces
    # After the first frame and before the last, a frame asked for while sessions
    # shared the batches waited for FRAME_TOKENS pieces.
    middle = [n for i in (1, 2) for n, shared in frames[i][1:-1] if shared]
    assert middle and min(middle) >= FRAME_TOKENS


async def test_a_seed_gives_the_same_tokens_and_another_seed_others(tiny_models: Path) -> None:
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            first = await generate(service, "Hello", 30, sampling)
            again = await generate(service, "Hello", 30, sampling)
            other = await generate(service, "Hello", 30, replace(sampling, seed=99))
            greedy = await generate(service, "Hello", 30)
    assert first == again
    assert first != other and first != greedy


@pytest.mark.parametrize(
    ("sampling", "allowed"),
    [
        (Sampling(), {3}),
        (Sampling(1.0, top_k=2, seed=0), {3, 1}),
        (Sampling(1.0, top_p=0.5, seed=0), {3}),
        (Sampling(1.0, top_p=0.75, seed=0), {3, 1}),
        (Sampling(100.0, seed=0), {0, 1, 2, 3}),
    ],
)
def test_sampling_draws_only_from_the_tokens_it_keeps(
    sampling: Sampling, allowed: set[int]
) -> None:
    logits = np.log(np.array([0.05, 0.3, 0.05, 0.6]))
    rng = np.random.Generator(np.random.PCG64(sampling.seed or 0))
    drawn = {choose_token(logits, sampling, rng) for _ in range(300)}
    assert drawn == allowed


async def test_too_many_sessions_is_overloaded_and_leaves_no_cache(tiny_models: Path) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models, max_sessions=2) as service:
            async with (
                service.open_session(MODEL_ID, "one", 20, Sampling()),
                service.open_session(MODEL_ID, "two", 20, Sampling()),
            ):
                held = service.cache_bytes
                assert held > 0
                with pytest.raises(JobError) as refused:
                    async with service.open_session(MODEL_ID, "three", 20, Sampling()):
                        pass
                assert refused.value.code is ErrorCode.OVERLOADED
                assert "max_sessions" in refused.value.message
                assert service.cache_bytes == held
            assert service.cache_bytes == 0 and service.sessions == 0


async def test_the_cache_counts_against_the_model_memory_budget(tiny_models: Path) -> None:
    cards = read_repository(tiny_models)
    model_mb = cards[0].memory_bytes / (1 << 20)
    per_token = 2 * LAYERS * HEADS * HEAD_DIM * 4
    room_tokens = 100
    budget = model_mb + room_tokens * per_token / (1 << 20)
    with trio.fail_after(30):
        async with generations(tiny_models, model_memory_mb=budget) as service:
            prompt = "x" * 10
            async with service.open_session(MODEL_ID, prompt, 60, Sampling()):
                assert service.cache_bytes == (10 + 60) * per_token
                with pytest.raises(JobError) as refused:
                    async with service.open_session(MODEL_ID, prompt, 60, Sampling()):
                        pass
                assert refused.value.code is ErrorCode.OVERLOADED
                assert "model_memory_mb" in refused.value.message
                async with service.open_session(MODEL_ID, prompt, 20, Sampling()):
                    assert service.cache_bytes == (70 + 30) * per_token
            assert service.cache_bytes == 0


async def test_a_live_cache_counts_when_another_model_loads_on_demand(
    tiny_models: Path, tmp_path: Path
) -> None:
    """Budget for the decoder, digits-logreg and a 100-token cache less a byte: the
    cache unloads the idle digits model, which cannot load again until it ends."""
    shutil.copytree(tiny_models / MODEL_ID, tmp_path / MODEL_ID)
    shutil.copytree(bundled_models_dir() / "digits-logreg", tmp_path / "digits-logreg")
    cards = {c.id: c for c in read_repository(tmp_path)}
    cache = 100 * 2 * LAYERS * HEADS * HEAD_DIM * 4
    memory = cards[MODEL_ID].memory_bytes + cards["digits-logreg"].memory_bytes
    config = ExecutorConfig(model_memory_mb=(memory + cache - 1) / (1 << 20))
    executor = Executor.from_cards(list(cards.values()), config)
    service = Generations(executor, list(cards.values()), config)
    rows = {"input": np.zeros((1, 64), np.float32)}
    assert executor.models.loaded == {MODEL_ID, "digits-logreg"}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            async with service.open_session(MODEL_ID, "x" * 10, 90, GREEDY):
                assert service.cache_bytes == cache
                assert executor.models.loaded == {MODEL_ID}  # made room for the cache
                with pytest.raises(JobError) as refused:
                    await executor.run("digits-logreg", rows)
            assert service.cache_bytes == 0
            labels = (await executor.run("digits-logreg", rows)).outputs
            nursery.cancel_scope.cancel()
    assert refused.value.code is ErrorCode.OVERLOADED
    assert "KV caches" in refused.value.message and "model_memory_mb" in refused.value.message
    assert executor.models.loaded == {MODEL_ID, "digits-logreg"}
    assert "label" in labels


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "says"),
    [
        ("", 5, "the prompt is empty"),
        ("x" * 200, 5, "takes at most 127"),
        ("hello", 11, "at most 10 per request (max_new_tokens, --max-new-tokens)"),
    ],
)
async def test_bad_input_is_invalid_and_leaves_no_cache(
    tiny_models: Path, prompt: str, max_tokens: int, says: str
) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models, max_new_tokens=10) as service:
            with pytest.raises(JobError) as refused:
                async with service.open_session(MODEL_ID, prompt, max_tokens, Sampling()):
                    pass
            assert refused.value.code is ErrorCode.INVALID_INPUT
            assert says in refused.value.message
            assert service.cache_bytes == 0 and service.sessions == 0


async def test_a_model_that_does_not_generate_is_named(tiny_models: Path) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            with pytest.raises(JobError) as unknown:
                async with service.open_session("gpt-9", "hi", 5, Sampling()):
                    pass
    assert unknown.value.code is ErrorCode.UNKNOWN_MODEL and MODEL_ID in unknown.value.message


async def test_a_client_that_leaves_frees_the_cache_at_once(tiny_models: Path) -> None:
    with trio.fail_after(30):
        async with generations(tiny_models) as service:
            with trio.CancelScope() as hang_up:
                async with service.open_session(MODEL_ID, "Hello", 100, Sampling()) as g:
                    await g.next()
                    assert service.cache_bytes > 0
                    hang_up.cancel()
                    await trio.sleep_forever()
            assert service.cache_bytes == 0 and service.sessions == 0
            # the engine goes on serving others
            assert len(await generate(service, "Hello", 5)) > 0


async def test_a_client_waiting_for_a_fuller_frame_is_not_idle(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_step = generation_module._run_step

    def slow_step(*args: Any) -> Any:
        time.sleep(0.02)  # a bigger model: 8 steps take longer than session_idle_s
        return run_step(*args)

    monkeypatch.setattr(generation_module, "_run_step", slow_step)
    got: list[int] = []

    async def one(sizes: list[int]) -> None:
        async with service.open_session(MODEL_ID, PROMPTS[0], 20, GREEDY) as generation:
            while pieces := await generation.next_pieces():
                sizes.append(len(pieces))

    with trio.fail_after(30):  # a real clock, as below
        async with generations(tiny_models, session_idle_s=0.1) as service:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, got)
                nursery.start_soon(one, [])
            assert service.failed == 0 and service.cache_bytes == 0
    assert max(got) >= FRAME_TOKENS  # it did wait for fuller frames, past 0.1 s


async def test_an_idle_client_ends_its_session(tiny_models: Path) -> None:
    # A real clock: the decode steps run in worker threads, which autojump_clock
    # would jump over.
    with trio.fail_after(10):
        async with generations(tiny_models, session_idle_s=0.3) as service:
            with pytest.raises(JobError) as idle:
                async with service.open_session(MODEL_ID, "Hello", 100, Sampling()) as g:
                    await g.next()
                    await trio.sleep_forever()  # takes nothing more
            assert idle.value.code is ErrorCode.DEADLINE_EXCEEDED
            assert "session_idle_s" in idle.value.message
            assert service.cache_bytes == 0 and service.sessions == 0
