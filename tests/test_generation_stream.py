"""Generation over the network: streamed through a forwarding node, the same tokens as
a direct onnxruntime loop; the same seed on two nodes; hang-ups, limits and bad input
leave no cache behind; and the generate protocol's messages on the wire."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.peer.id import ID
from test_cli import p2p_node, running_node
from test_generation import PROMPTS, reference_tokens
from tiny_decoder import MODEL_ID, tiny_tokenizer, write_tiny_decoder

from p2p_node import Client, NodeConfig
from p2p_node import _generation as generation_module
from p2p_node._channel import Channel
from p2p_node._codec import decode_reply, decode_request, encode
from p2p_node._framing import Kind, Tagged, TaggedBuffer
from p2p_node._messages import (
    ErrorReply,
    GeneratedPiece,
    GenerateRequest,
    GenerateSummary,
    InvalidMessage,
    RunRequest,
    WireError,
)
from p2p_node._stream_gen import GENERATE_PIPE_PROTOCOL, GENERATE_PROTOCOL
from p2p_node.testing import Swarm, open_swarm
from scheduler import ErrorCode, InferenceRequest, JobError

NOBODY: frozenset[str] = frozenset()
TINY = frozenset({MODEL_ID})


def _base(models_dir: Path, tmp_path: Path, **executor: object) -> NodeConfig:
    config = NodeConfig(data_dir=tmp_path, shutdown_grace=1.0, target_degree=0)
    return replace(config, models_dir=models_dir, executor=replace(config.executor, **executor))


async def _wait_for_zero_cache(swarm: Swarm, i: int) -> None:
    await swarm[i].generations.wait_until(lambda g: g.cache_bytes == 0 and g.sessions == 0)


async def test_greedy_generation_through_a_forwarding_node_is_the_direct_loop(
    tiny_models: Path, tmp_path: Path
) -> None:
    prompt = "Hello world"
    expected = reference_tokens(tiny_models / MODEL_ID, prompt, 100)
    assert len(expected) == 100  # no end-of-text before
    base = _base(tiny_models, tmp_path)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate(prompt, MODEL_ID, max_tokens=100) as generation:
                    pieces = [piece async for piece in generation]
                summary = generation.summary
                tokens = generation.tokens
                by_task = await client.generate_text(prompt, task="text-generation", max_tokens=5)
            assert swarm[1].generations.cache_bytes == 0
    assert tokens == expected
    assert summary is not None
    assert summary.executor == swarm[1].peer_id and summary.model_id == MODEL_ID
    assert summary.tokens == len(expected) and summary.text.startswith("".join(pieces))
    assert 0 < summary.ttft_ms <= summary.total_ms
    assert by_task == summary.text[: len(by_task)]  # the same greedy start


async def test_run_distributed_inference_on_a_generation_request_returns_the_whole_text(
    tiny_models: Path, tmp_path: Path
) -> None:
    prompts = ("Hello world", "The quick brown fox", "a")
    expected = [reference_tokens(tiny_models / MODEL_ID, p, 40) for p in prompts]
    base = _base(tiny_models, tmp_path, max_new_tokens=40)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            request = InferenceRequest(MODEL_ID, {}, texts=prompts)
            result = await swarm[0].orchestrator.run_distributed_inference(request)
            async with Client.connect(swarm[0].addrs[0]) as client:
                submitted = await client.submit(MODEL_ID, texts=prompts[:1])
                with pytest.raises(JobError) as tensors:
                    await client.submit(MODEL_ID, {"input_ids": np.zeros((1, 2), np.int64)})
            await _wait_for_zero_cache(swarm, 1)
    assert result.executor == swarm[1].peer_id and result.model_id == MODEL_ID
    assert result.texts == tuple(tiny_tokenizer().decode(tokens) for tokens in expected)
    assert result.outputs["tokens"].tolist() == [len(tokens) for tokens in expected]
    assert submitted.texts == result.texts[:1]
    assert tensors.value.code is ErrorCode.INVALID_INPUT


async def test_a_seed_gives_the_same_tokens_on_two_different_nodes(
    tiny_models: Path, tmp_path: Path
) -> None:
    options = {"max_tokens": 60, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 42}
    runs = []
    with trio.fail_after(60):
        for i in range(2):  # two swarms of one node each: two executing nodes
            base = _base(tiny_models, tmp_path / f"swarm{i}")
            async with (
                open_swarm(1, base=base) as swarm,
                Client.connect(swarm[0].addrs[0]) as client,
            ):
                async with client.generate("Hello", MODEL_ID, **options) as generation:
                    await generation.text()
                assert generation.summary is not None
                runs.append((generation.tokens, generation.summary.executor))
                async with client.generate("Hello", MODEL_ID, **{**options, "seed": 43}) as other:
                    await other.text()
    (first, peer_a), (second, peer_b) = runs
    assert peer_a != peer_b
    assert first == second and len(first) > 10
    assert other.tokens != first


async def test_a_client_that_hangs_up_ends_the_session_on_the_executing_node(
    tmp_path: Path,
) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)  # long enough not to end by itself
    base = _base(models_dir, tmp_path / "nodes", max_new_tokens=4000)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            generations = swarm[1].generations
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate("Hello", MODEL_ID, max_tokens=4000) as generation:
                    await generation.next_piece()
                    await generation.next_piece()
                    assert generations.sessions == 1 and generations.cache_bytes > 0
            await _wait_for_zero_cache(swarm, 1)
            assert generations.cancelled == 1 and generations.finished == 0


async def test_too_many_sessions_is_overloaded_and_leaves_no_cache(
    tmp_path: Path,
) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)
    base = _base(models_dir, tmp_path / "nodes", max_sessions=1, max_new_tokens=4000)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            generations = swarm[1].generations
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate("Hello", MODEL_ID, max_tokens=4000) as running:
                    await running.next_piece()
                    held = generations.cache_bytes
                    with pytest.raises(JobError) as refused:
                        await client.generate_text("Hi", MODEL_ID, max_tokens=5)
                    assert refused.value.code is ErrorCode.OVERLOADED
                    assert "max_sessions" in refused.value.message
                    assert generations.cache_bytes == held and generations.refused == 1
            await _wait_for_zero_cache(swarm, 1)


async def test_generate_streams_count_under_the_inbound_stream_limit(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)
    base = replace(
        _base(models_dir, tmp_path / "nodes", max_new_tokens=4000), max_concurrent_inbound=2
    )
    with trio.fail_after(60):
        async with open_swarm(1, base=base) as swarm:
            generations = swarm[0].generations
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with contextlib.AsyncExitStack() as stack:
                    for _ in range(2):
                        running = await stack.enter_async_context(
                            client.generate("Hello", MODEL_ID, max_tokens=4000)
                        )
                        await running.next_piece()
                    held = generations.cache_bytes
                    with pytest.raises(JobError) as refused:
                        await client.generate_text("Hi", MODEL_ID, max_tokens=5)
                    assert refused.value.code is ErrorCode.OVERLOADED
                    assert "max_concurrent_inbound" in refused.value.message
                    assert generations.sessions == 2 and generations.cache_bytes == held
                    assert generations.started == 2
                await _wait_for_zero_cache(swarm, 0)
                assert await client.generate_text("Hi", MODEL_ID, max_tokens=5)  # room again


async def test_a_running_generation_counts_as_load_and_the_next_goes_elsewhere(
    tmp_path: Path,
) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)
    base = _base(models_dir, tmp_path / "nodes", max_new_tokens=4000)
    with trio.fail_after(60):
        async with open_swarm(3, models=[NOBODY, TINY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate("Hello", MODEL_ID, max_tokens=4000) as first:
                    await first.next_piece()
                    busy = next(i for i in (1, 2) if swarm[i].generations.sessions)
                    busy_id = swarm[busy].peer_id
                    assert swarm[busy].running == 1
                    await swarm[0].view.wait_until(
                        lambda view: view.peers[busy_id].record.load.in_flight == 1
                    )
                    async with client.generate("Hi", MODEL_ID, max_tokens=3) as second:
                        await second.text()
            assert second.summary is not None
            assert second.summary.executor == swarm[3 - busy].peer_id


@pytest.mark.parametrize(
    ("model", "prompt", "max_tokens", "code", "says"),
    [
        (MODEL_ID, "x" * 300, 5, ErrorCode.INVALID_INPUT, "takes at most 127"),
        (MODEL_ID, "hello", 50, ErrorCode.INVALID_INPUT, "--max-new-tokens"),
        ("no-such-model", "hello", 5, ErrorCode.NO_CAPABLE_PEER, "no-such-model"),
    ],
)
async def test_bad_input_is_refused_by_name_and_leaves_no_cache(
    tiny_models: Path,
    tmp_path: Path,
    model: str,
    prompt: str,
    max_tokens: int,
    code: ErrorCode,
    says: str,
) -> None:
    base = _base(tiny_models, tmp_path, max_new_tokens=20)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            async with Client.connect(swarm[0].addrs[0]) as client:
                with pytest.raises(JobError) as refused:
                    await client.generate_text(prompt, model, max_tokens=max_tokens)
                # the node goes on generating
                assert await client.generate_text("hello", MODEL_ID, max_tokens=3)
            assert swarm[1].generations.cache_bytes == 0
    assert refused.value.code is code and says in refused.value.message


# --- the messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        GenerateRequest("job", MODEL_ID, "Hello", 5, 1000),
        GenerateRequest(
            "job",
            "",
            "Hé",
            100,
            5000,
            0.7,
            40,
            0.9,
            2**64 - 1,
            "text-generation",
            "hybrid",
            {"language": "en"},
            forward=False,
        ),
        GeneratedPiece((17,), "lo"),
        GeneratedPiece((0, 1, 2), ""),
        GenerateSummary("job", MODEL_ID, "Hello there", 2, "eos", "peer", 1.5, 9.0),
    ],
)
def test_generate_messages_come_back_as_they_went(message: object) -> None:
    payload = encode(message)  # type: ignore[arg-type]
    decode = decode_request if isinstance(message, GenerateRequest) else decode_reply
    assert decode(payload) == message


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"model_id": ""}, "model_id must be"),
        ({"task": "text-generation"}, "not both"),
        ({"max_tokens": 0}, "max_tokens must be in [1,"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"temperature": -1.0}, "temperature"),
        ({"seed": -1}, "seed"),
    ],
)
def test_a_bad_generate_request_is_refused_where_it_is_built(
    fields: dict[str, object], says: str
) -> None:
    valid = {"job_id": "j", "model_id": MODEL_ID, "prompt": "hi", "max_tokens": 3}
    with pytest.raises(InvalidMessage) as refused:
        GenerateRequest(**{**valid, "timeout_ms": 100, **fields})  # type: ignore[arg-type]
    assert says in refused.value.message


def test_a_peer_s_bad_generate_request_is_malformed() -> None:
    payload = bytearray(encode(GenerateRequest("job", MODEL_ID, "Hello", 5, 1000)))
    bad = bytes(payload).replace(b"Hello", b"\xff\xfe\xfd\xfc\xfb")
    with pytest.raises(WireError) as refused:
        decode_request(bad)
    assert refused.value.code is ErrorCode.MALFORMED_MESSAGE


# --- the command line --------------------------------------------------------------------


@pytest.mark.system
def test_the_generate_command_prints_the_text_and_with_json_who_ran_it(
    tiny_models: Path, tmp_path: Path
) -> None:
    expected = tiny_tokenizer().decode(reference_tokens(tiny_models / MODEL_ID, "Hello", 20))
    with running_node(tmp_path / "node", "--models", str(tiny_models)) as (_proc, addr):
        as_json = p2p_node(
            *("generate", "--peer", addr, "--model", MODEL_ID, "--prompt", "Hello"),
            *("--max-tokens", "20", "--json"),
        )
        as_text = p2p_node(
            *("generate", "--peer", addr, "--task", "text-generation", "--prompt", "Hello"),
            *("--max-tokens", "20"),
        )
        bad = p2p_node(
            *("generate", "--peer", addr, "--model", MODEL_ID, "--prompt", "Hello"),
            *("--top-p", "1.5"),
        )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["text"] == expected and answer["tokens"] == 20
    assert answer["executor"] == addr.rsplit("/", 1)[1] and answer["model"] == MODEL_ID
    assert 0 < answer["ttft_ms"] <= answer["total_ms"]
    assert as_text.returncode == 0, as_text.stderr
    assert as_text.stdout == expected + "\n"
    assert "20 tokens (length)" in as_text.stderr
    assert bad.returncode == 2 and "--top-p must be in (0, 1]" in bad.stderr


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\xc1garbage", "not a msgpack message"),
        (
            encode(GenerateSummary("job", MODEL_ID, "", 0, "eos", "peer", 0.0, 0.0)),
            "unexpected message kind",
        ),
        (
            encode(RunRequest("job", MODEL_ID, {"x": np.zeros(1, np.float32)}, 1000)),
            "takes GenerateRequest, not RunRequest",
        ),
    ],
)
async def test_a_peer_s_bad_frame_on_the_generate_protocol_gets_a_typed_error(
    tiny_models: Path, tmp_path: Path, frame: bytes, says: str
) -> None:
    base = _base(tiny_models, tmp_path)
    with trio.fail_after(30):
        async with open_swarm(1, base=base) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                stream = await client._rpc.open_stream(swarm[0].peer_id, GENERATE_PROTOCOL, 5)
                channel = Channel(stream, 1 << 20)
                await channel.send(frame)
                reply = decode_reply(await channel.receive())
                await channel.discard()
                assert await client.generate_text("Hello", MODEL_ID, max_tokens=3)
    assert isinstance(reply, ErrorReply)
    assert reply.code is ErrorCode.MALFORMED_MESSAGE and says in reply.message


async def test_generations_share_one_kept_stream_and_a_hang_up_ends_only_its_own(
    tmp_path: Path,
) -> None:
    models_dir = tmp_path / "models"
    write_tiny_decoder(models_dir, context=4096)
    base = _base(models_dir, tmp_path / "nodes", max_new_tokens=4000)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            generations = swarm[1].generations
            async with Client.connect(swarm[0].addrs[0]) as client:
                async with client.generate("Hello", MODEL_ID, max_tokens=4000) as kept:
                    await kept.next_piece()
                    async with client.generate("Hi", MODEL_ID, max_tokens=4000) as left:
                        await left.next_piece()
                        pipe = swarm[0]._rpc.pipes[swarm[1].peer_id, GENERATE_PIPE_PROTOCOL]
                        in_flight = pipe.in_flight
                    await generations.wait_until(lambda g: g.cancelled == 1)
                    assert generations.sessions == 1
                    before = len(kept.tokens)
                    await kept.next_piece()
                    assert len(kept.tokens) > before  # the other one goes on
            await _wait_for_zero_cache(swarm, 1)
    assert in_flight == 2  # both on the forwarder's one kept stream to the executor


async def test_generations_started_together_are_prefilled_together_and_step_together(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's generations started at once go in one write, and so do the ones
    the forwarding node passes on: the executing node prefills them in one run
    and steps them all together from the first step. Were the first written
    alone, it would be prefilled alone and run ahead of the others, its cache
    longer than theirs in every step after."""
    monkeypatch.setattr(generation_module, "JOIN_WAIT_S", 60.0)  # (see test_generation)
    max_new = 12
    for prompt in PROMPTS:  # none ends before max_new: every step has them all
        assert len(reference_tokens(tiny_models / MODEL_ID, prompt, max_new)) == max_new
    base = _base(tiny_models, tmp_path, max_new_tokens=max_new)
    with trio.fail_after(60):
        async with open_swarm(2, models=[NOBODY, TINY], base=base) as swarm:
            await swarm.wait_converged()
            engine = swarm[1].generations.engine(MODEL_ID)

            def counts() -> tuple[int, int, int]:
                return engine.prefill_runs, engine.steps, engine.batched_rows

            async with Client.connect(swarm[0].addrs[0]) as client:
                await client.generate_text("warm up", MODEL_ID, max_tokens=2)
                before = counts()
                generate = partial(client.generate_text, model_id=MODEL_ID, max_tokens=max_new)
                async with trio.open_nursery() as nursery:
                    for prompt in PROMPTS:
                        nursery.start_soon(generate, prompt)
            await _wait_for_zero_cache(swarm, 1)
            prefills, steps, rows = (now - then for now, then in zip(counts(), before, strict=True))
    assert (prefills, steps) == (1, max_new - 1)
    assert rows == len(PROMPTS) * steps


async def test_generate_requests_on_a_kept_stream_are_taken_as_they_arrive(
    tiny_models: Path, tmp_path: Path
) -> None:
    # The executing node's reader waits for its next read whenever a generation is
    # asked for, so it takes each request as it arrives (_libp2p.tap), a scheduling
    # round sooner, and reads none from its stream's buffer.
    base = _base(tiny_models, tmp_path)
    count = 8
    with trio.fail_after(60):
        async with open_swarm(1, base=base) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                await client.generate_text("warm", MODEL_ID, max_tokens=2)
                network = swarm[0]._rpc.host.get_network()
                (conn,) = network.connections[ID.from_base58(client._rpc.peer_id)]
                streams = conn.get_streams()
                (served,) = [s for s in streams if s.get_protocol() == GENERATE_PIPE_PROTOCOL]
                read, reads = served.read, [0]

                async def counting(n: int | None = None) -> bytes:
                    data: bytes = await read(n)
                    reads[0] += bool(data)
                    return data

                served.read = counting
                for i in range(count):
                    assert await client.generate_text(f"Hello {i}", MODEL_ID, max_tokens=2)
    assert reads[0] <= count // 4  # one a request, were they read from the buffer


async def test_a_peer_without_kept_generate_streams_gets_a_stream_per_generation(
    tiny_models: Path, tmp_path: Path
) -> None:
    """A node of a version before `/2.0.0` is still asked, on `/1.0.0`."""
    base = _base(tiny_models, tmp_path)
    with trio.fail_after(30):
        async with open_swarm(1, base=base) as swarm:
            swarm[0]._rpc.host.remove_stream_handler(GENERATE_PIPE_PROTOCOL)
            async with Client.connect(swarm[0].addrs[0]) as client:
                first = await client.generate_text("Hello", MODEL_ID, max_tokens=5)
                second = await client.generate_text("Hello", MODEL_ID, max_tokens=5)
                speaks = client._rpc.speaks(swarm[0].peer_id, GENERATE_PIPE_PROTOCOL)
            await _wait_for_zero_cache(swarm, 0)
            assert swarm[0].generations.finished == 2
    assert first and first == second
    assert not speaks


async def test_bad_frames_on_a_kept_generate_stream_get_typed_errors(
    tiny_models: Path, tmp_path: Path
) -> None:
    """A request that is no GenerateRequest is answered on its exchange; bytes that
    are no frame end the stream with a GOAWAY; the node serves on."""
    base = _base(tiny_models, tmp_path)
    run = encode(RunRequest("job", MODEL_ID, {"x": np.zeros(1, np.float32)}, 1000))
    with trio.fail_after(30):
        async with open_swarm(1, base=base) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:
                stream = await client._rpc.open_stream(swarm[0].peer_id, GENERATE_PIPE_PROTOCOL, 5)
                frames = TaggedBuffer(1 << 20)
                got: list[Tagged] = []

                async def next_frame() -> Tagged:
                    while (frame := frames.next_frame()) is None:
                        frames.feed(await stream.read(4096))
                    return frame

                await stream.write(Tagged(Kind.REQUEST, 7, run).encode())
                got.append(await next_frame())
                await stream.write(bytes([9, 1, 0]))  # a kind no frame has
                got.append(await next_frame())
                await stream.reset()
                assert await client.generate_text("Hello", MODEL_ID, max_tokens=3)
    answer, goaway = got
    assert answer.kind is Kind.REPLY and answer.exchange == 7
    reply = decode_reply(answer.body)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.MALFORMED_MESSAGE
    assert "takes GenerateRequest, not RunRequest" in reply.message
    assert goaway.kind is Kind.GOAWAY
    why = decode_reply(goaway.body)
    assert isinstance(why, ErrorReply) and why.code is ErrorCode.MALFORMED_MESSAGE


_VALID = [
    encode(GenerateRequest("job", "", "Hé", 100, 5000, 0.7, 40, 0.9, 7, "text-generation")),
    encode(GeneratedPiece((17, 3), "lo")),
    encode(GenerateSummary("job", MODEL_ID, "Hello there", 2, "eos", "peer", 1.5, 9.0)),
]


@given(st.sampled_from(_VALID), st.integers(0, 2**16), st.binary(min_size=1, max_size=8))
def test_mutated_generate_frames_decode_or_raise_a_wire_error(
    payload: bytes, at: int, patch: bytes
) -> None:
    at %= len(payload)
    mutated = payload[:at] + patch + payload[at + len(patch) :]
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(WireError):  # anything else fails the test
            decode(mutated)
