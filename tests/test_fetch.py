"""Models fetched from peers by content, across real nodes: MiniLM (21.8 MiB) fetched
by a fresh node from two peers that serve it, through corruption, a peer's death,
a restart, the node's limits, and a server that refuses what it does not announce."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from p2p_node import Client, ExecutorConfig, NodeConfig, PreSharedKey, bundled_models_dir
from p2p_node._channel import Channel
from p2p_node._config import AdmissionConfig, FetchConfig
from p2p_node._fetch import FETCH_PROTOCOL, FetchError, FetchFailure, announcers
from p2p_node._framing import encode_varint
from p2p_node._manifest import (
    MANIFEST_FILE,
    ChunkAsk,
    Manifest,
    ManifestAsk,
    ProgressAsk,
    Refusal,
    build_manifest,
    decode_reply,
    encode_request,
)
from p2p_node._node import Node, open_node
from p2p_node._shard import copy_bundled_stages
from p2p_node.testing import Swarm, open_swarm
from scheduler import ErrorCode

MINILM = "minilm-l6-v2"
SOURCE = bundled_models_dir() / MINILM
TEXTS = ("the cat sat on the mat", "content addressing by sha256")
TIMEOUT_S = 120


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@asynccontextmanager
async def serving_swarm(n: int = 2) -> AsyncIterator[Swarm]:
    """n nodes that serve MiniLM (and only it)."""
    base = NodeConfig(data_dir=Path(), shutdown_grace=1.0, target_degree=0)
    async with open_swarm(n, base=base, models=[frozenset({MINILM})] * n) as swarm:
        yield swarm


@asynccontextmanager
async def fetcher(
    swarm: Swarm, data_dir: Path, *, wait_for: int = 2, **config: object
) -> AsyncIterator[Node]:
    """A node that serves a tiny model, bootstrapped to the swarm, once it sees
    `wait_for` peers announcing MiniLM."""
    executor = config.pop("executor", ExecutorConfig())
    node_config = NodeConfig(
        data_dir=data_dir,
        serve_models=frozenset({"digits-logreg"}),
        bootstrap=tuple(swarm[i].addrs[0] for i in swarm.live),
        target_degree=0,
        shutdown_grace=1.0,
        executor=executor,  # type: ignore[arg-type]
        **config,  # type: ignore[arg-type]
    )
    async with open_node(node_config) as node:
        await node.view.wait_until(lambda v: len(announcers(v, MINILM, None)) >= wait_for)
        yield node


async def embed(node: Node) -> np.ndarray:
    execution = await node.executor.run(MINILM, {}, texts=TEXTS)
    return next(iter(execution.outputs.values()))


def assert_same_files(model_dir: Path) -> None:
    for original in SOURCE.iterdir():
        assert sha256(model_dir / original.name) == sha256(original), original.name
    names = {p.name for p in model_dir.iterdir()} - {MANIFEST_FILE}
    assert names == {p.name for p in SOURCE.iterdir()}


async def test_a_fresh_node_serves_a_model_fetched_from_two_peers(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm, fetcher(swarm, tmp_path / "f") as node:
            assert not node.executor.serves(MINILM)
            assert await node.fetches.fetch(MINILM) == MINILM
            assert node.executor.serves(MINILM)
            assert all(swarm[i].fetches.served_chunks > 0 for i in (0, 1))
            assert node.fetches.corrupt_chunks == 0
            assert_same_files(tmp_path / "f" / "models" / MINILM)
            np.testing.assert_allclose(await embed(node), await embed(swarm[0]), atol=1e-6)
            # It announces the model now, and serves it to others in turn.
            await swarm[0].view.wait_until(lambda v: node.peer_id in announcers(v, MINILM, None))
            progress = node.fetches.progress[MINILM].frozen()
            assert (progress.state, progress.done_bytes) == ("done", progress.total_bytes)
            assert progress.total_bytes > 20 * (1 << 20)


async def test_a_corrupted_chunk_is_fetched_again_from_the_other_peer(tmp_path: Path) -> None:
    """Chunk 3 of model.onnx goes out corrupted the first time, whichever peer sends
    it; the fetcher drops that peer and takes the chunk from the other."""
    onnx_sha = sha256(SOURCE / "model.onnx")
    served: list[tuple[int, bool]] = []  # (peer index, corrupted) for chunk 3

    def tamper(peer: int) -> Callable[[str, int, bytes], bytes]:
        def corrupt(file_sha: str, index: int, data: bytes) -> bytes:
            if file_sha != onnx_sha or index != 3:
                return data
            served.append((peer, not served))
            return b"\xff" + data[1:] if served[-1][1] else data

        return corrupt

    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm, fetcher(swarm, tmp_path / "f") as node:
            for i in (0, 1):
                swarm[i].fetches.tamper = tamper(i)
            await node.fetches.fetch(MINILM)
            assert node.executor.serves(MINILM)
            assert node.fetches.corrupt_chunks == 1
            (bad, corrupted), (good, clean) = served
            assert corrupted and not clean and bad != good
            assert_same_files(tmp_path / "f" / "models" / MINILM)
            np.testing.assert_allclose(await embed(node), await embed(swarm[good]), atol=1e-6)


async def test_a_peer_only_sending_corrupt_chunks_leaves_no_model(tmp_path: Path) -> None:
    """With every peer corrupting, nothing is served, and nothing bad is kept."""
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm:
            for i in (0, 1):
                swarm[i].fetches.tamper = lambda f, i, d: bytes(len(d))
            config = FetchConfig(find_timeout=0.5)
            async with fetcher(swarm, tmp_path / "f", fetch=config) as node:
                with pytest.raises(FetchError) as caught:
                    await node.fetches.fetch(MINILM)
                assert caught.value.failure is FetchFailure.NO_PEER
                assert not node.executor.serves(MINILM)
                assert not (tmp_path / "f" / "models" / MINILM).exists()
                assert node.fetches.corrupt_chunks >= 2  # at least one from each peer


async def test_a_manifest_of_another_model_onnx_is_refused(tmp_path: Path) -> None:
    """A peer answering for MiniLM with the manifest of another model.onnx (valid in
    itself: its model.onnx hashes to its own model_sha256) is never fetched from."""
    other = build_manifest(bundled_models_dir() / "digits-logreg", MINILM)

    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm(1) as swarm:
            honest = swarm[0].fetches._reply

            async def lying(request: object) -> object:
                if isinstance(request, ManifestAsk):
                    await trio.lowlevel.checkpoint()
                    return other
                return await honest(request)  # type: ignore[arg-type]

            swarm[0].fetches._reply = lying  # type: ignore[method-assign,assignment]
            config = FetchConfig(find_timeout=0.5)
            async with fetcher(swarm, tmp_path / "f", wait_for=1, fetch=config) as node:
                with pytest.raises(FetchError) as caught:
                    await node.fetches.fetch(MINILM)
                assert caught.value.failure is FetchFailure.NO_PEER
                assert "valid manifest" in caught.value.message
                assert not node.executor.serves(MINILM)
                assert swarm[0].fetches.served_chunks == 0


async def test_a_peer_dying_mid_fetch_leaves_the_rest_to_the_other(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm, fetcher(swarm, tmp_path / "f") as node:
            some_sent = trio.Event()

            def note(file_sha: str, index: int, data: bytes) -> bytes:
                if swarm[0].fetches.served_chunks >= 2:
                    some_sent.set()
                return data

            swarm[0].fetches.tamper = note
            async with trio.open_nursery() as nursery:

                async def kill_when_serving() -> None:
                    await some_sent.wait()
                    await swarm.kill(0)

                nursery.start_soon(kill_when_serving)
                await node.fetches.fetch(MINILM)
            assert 2 <= swarm[0].fetches.served_chunks < 22
            assert swarm[1].fetches.served_chunks > 0
            assert_same_files(tmp_path / "f" / "models" / MINILM)
            assert node.executor.serves(MINILM)


async def test_a_fetched_model_is_served_again_after_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "f"
    config = FetchConfig(models=(MINILM,))
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm:
            async with fetcher(swarm, data_dir, fetch=config) as node:  # fetches at start
                assert (await node.fetches.wait_ended(MINILM)).state == "done"
                before = await embed(node)
        # Alone now: no peer to fetch from, and none needed.
        alone = NodeConfig(data_dir=data_dir, serve_models=frozenset({"digits-logreg"}))
        async with open_node(replace(alone, fetch=config)) as node:
            assert node.executor.serves(MINILM)
            np.testing.assert_allclose(await embed(node), before, atol=1e-6)
            assert (await node.fetches.wait_ended(MINILM)).state == "done"  # nothing to fetch
        # A fetched file changed on disk: the model is not served from it.
        (data_dir / "models" / MINILM / "tokenizer.json").write_text("{}")
        async with open_node(alone) as node:
            assert not node.executor.serves(MINILM)


async def test_a_model_over_the_limits_is_refused_before_any_download(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm:
            small = ExecutorConfig(model_memory_mb=5)
            async with fetcher(swarm, tmp_path / "a", executor=small) as node:
                with pytest.raises(FetchError) as caught:
                    await node.fetches.fetch(MINILM)
                assert caught.value.failure is FetchFailure.OVER_BUDGET
                assert "--model-memory-mb" in caught.value.message
            async with fetcher(swarm, tmp_path / "b", fetch=FetchConfig(max_model_mb=10)) as node:
                with pytest.raises(FetchError) as caught:
                    await node.fetches.fetch(MINILM)
                assert caught.value.failure is FetchFailure.TOO_LARGE
            assert swarm[0].fetches.served_chunks == swarm[1].fetches.served_chunks == 0
            assert not (tmp_path / "a" / "models").exists()


async def ask(channel: Channel, payload: bytes) -> object:
    await channel.send(payload)
    return decode_reply(await channel.receive())


async def test_the_server_refuses_what_it_does_not_announce_and_bad_requests(
    tmp_path: Path,
) -> None:
    onnx_sha = sha256(SOURCE / "model.onnx")
    unannounced = sha256(bundled_models_dir() / "digits-logreg" / "model.onnx")
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm(1) as swarm, Client.connect(swarm[0].addrs[0]) as client:
            channel = Channel(await client.open_stream(FETCH_PROTOCOL), 1 << 22)
            refusals = {
                "unknown model": encode_request(ManifestAsk("digits-logreg", unannounced)),
                "wrong sha": encode_request(ManifestAsk(MINILM, unannounced)),
                "unannounced file": encode_request(ChunkAsk(unannounced, 0)),
                "random file": encode_request(ChunkAsk("ab" * 32, 0)),
                "past the end": encode_request(ChunkAsk(onnx_sha, 10_000)),
                "garbage": b"\xc1\x00garbage",
                "not a map": b"\x93\x01\x02\x03",
                "unknown kind": b"\x81\xa4kind\xa3zap",
                "extra field": b"\x83\xa4kind\xa5chunk\xa4file\x01\xa5index\x00",
                "negative index": encode_request(ChunkAsk(onnx_sha, 0))[:-1] + b"\xff",
                "empty": b"",
            }
            for case, payload in refusals.items():
                reply = await ask(channel, payload)
                assert isinstance(reply, Refusal), case
                assert reply.code in (
                    ErrorCode.UNKNOWN_MODEL,
                    ErrorCode.MALFORMED_MESSAGE,
                    ErrorCode.INVALID_INPUT,
                ), case
            # The same stream still answers a good request.
            manifest = await ask(channel, encode_request(ManifestAsk(MINILM, onnx_sha)))
            assert isinstance(manifest, Manifest) and manifest.model_sha256 == onnx_sha
            chunk = await ask(channel, encode_request(ChunkAsk(onnx_sha, 0)))
            assert isinstance(chunk, bytes)
            assert hashlib.sha256(chunk).hexdigest() == manifest.file("model.onnx").chunks[0]
            # An oversize frame ends the stream, not the node.
            await channel.stream.write(encode_varint(1 << 30) + b"x" * 100)
            with pytest.raises(Exception):  # noqa: B017  # reset or closed
                await channel.receive()
            channel = Channel(await client.open_stream(FETCH_PROTOCOL), 1 << 22)
            assert await ask(channel, encode_request(ProgressAsk())) == ()


async def test_in_a_private_network_with_an_allowlist_only_peers_and_allowed_clients_fetch(
    tmp_path: Path,
) -> None:
    onnx_sha = sha256(SOURCE / "model.onnx")
    psk = PreSharedKey.generate()
    base = NodeConfig(
        data_dir=Path(),
        shutdown_grace=1.0,
        target_degree=0,
        admission=AdmissionConfig(allowed_clients=frozenset()),
    )
    with trio.fail_after(TIMEOUT_S):
        async with open_swarm(2, base=base, models=[frozenset({MINILM})] * 2, psk=psk) as swarm:
            async with Client.connect(swarm[0].addrs[0], psk=psk) as client:
                channel = Channel(await client.open_stream(FETCH_PROTOCOL), 1 << 22)
                reply = await ask(channel, encode_request(ManifestAsk(MINILM, onnx_sha)))
                assert isinstance(reply, Refusal) and reply.code is ErrorCode.UNAUTHORIZED
                reply = await ask(channel, encode_request(ChunkAsk(onnx_sha, 0)))
                assert isinstance(reply, Refusal) and reply.code is ErrorCode.UNAUTHORIZED
            async with fetcher(swarm, tmp_path / "f", psk=psk) as node:  # a peer of the network
                await node.fetches.fetch(MINILM)
                assert node.executor.serves(MINILM)


async def test_a_fetch_cut_short_keeps_the_chunks_it_had(tmp_path: Path) -> None:
    """Chunks already in the fetching directory with the right hash are not asked for."""
    partial = tmp_path / "f" / "fetching" / MINILM
    partial.mkdir(parents=True)
    shutil.copyfile(SOURCE / "model.onnx", partial / "model.onnx")
    (partial / "weights.bin").write_bytes(b"left from another fetch")  # not in the manifest
    with (partial / "model.onnx").open("r+b") as f:  # chunk 5 went bad
        f.seek(5 * (1 << 20))
        f.write(b"\x00" * 16)
    with trio.fail_after(TIMEOUT_S):
        async with serving_swarm() as swarm, fetcher(swarm, tmp_path / "f") as node:
            await node.fetches.fetch(MINILM)
            served = swarm[0].fetches.served_chunks + swarm[1].fetches.served_chunks
            others = [p for p in SOURCE.iterdir() if p.name != "model.onnx"]
            assert served == 1 + sum(-(-p.stat().st_size // (1 << 20)) for p in others)
            assert_same_files(tmp_path / "f" / "models" / MINILM)
            assert not partial.exists()


async def test_a_file_changed_on_disk_is_never_sent(tmp_path: Path) -> None:
    """The serving side checks each chunk against the manifest as it reads it."""
    models = tmp_path / "models"
    shutil.copytree(SOURCE, models / MINILM)
    onnx_sha = sha256(SOURCE / "model.onnx")
    base = NodeConfig(data_dir=Path(), models_dir=models, shutdown_grace=1.0, target_degree=0)
    with trio.fail_after(TIMEOUT_S):
        async with open_swarm(1, base=base) as swarm, Client.connect(swarm[0].addrs[0]) as client:
            channel = Channel(await client.open_stream(FETCH_PROTOCOL), 1 << 22)
            manifest = await ask(channel, encode_request(ManifestAsk(MINILM, onnx_sha)))
            assert isinstance(manifest, Manifest)
            with (models / MINILM / "model.onnx").open("r+b") as f:
                f.seek(2 * manifest.chunk_bytes + 5)
                f.write(b"\x00\x01\x02")
            reply = await ask(channel, encode_request(ChunkAsk(onnx_sha, 2)))
            assert reply == Refusal(
                ErrorCode.INTERNAL, "model.onnx changed on the serving node's disk"
            )
            assert isinstance(await ask(channel, encode_request(ChunkAsk(onnx_sha, 1))), bytes)


async def test_a_fetched_generator_generates(tmp_path: Path) -> None:
    gpt = "pydoc-gpt-small"
    base = NodeConfig(data_dir=Path(), shutdown_grace=1.0, target_degree=0)
    with trio.fail_after(TIMEOUT_S):
        async with open_swarm(1, base=base, models=[frozenset({gpt})]) as swarm:
            async with Client.connect(swarm[0].addrs[0]) as client:  # the only copy yet
                there = await client.generate_text("def ", gpt, max_tokens=8)
            async with open_node(
                NodeConfig(
                    data_dir=tmp_path / "f",
                    serve_models=frozenset({"digits-logreg"}),
                    bootstrap=(swarm[0].addrs[0],),
                    target_degree=0,
                    shutdown_grace=1.0,
                    fetch=FetchConfig(models=(gpt,)),
                )
            ) as node:
                assert (await node.fetches.wait_ended(gpt)).state == "done"
                await swarm.kill(0)  # the fetched copy is the only one left
                async with Client.connect(node.addrs[0]) as client:
                    here = await client.generate_text("def ", gpt, max_tokens=8)
                assert here == there and here
                assert node.generations.started == 1


async def test_one_stage_of_a_staged_model_is_fetched_by_its_number(tmp_path: Path) -> None:
    """`--fetch MODEL@2` fetches the model a peer announces as stage 2 of MODEL."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_bundled_stages(MINILM, 2, repo)
    base = NodeConfig(data_dir=Path(), models_dir=repo, shutdown_grace=1.0, target_degree=0)
    target = f"{MINILM}@2"
    with trio.fail_after(TIMEOUT_S):
        async with open_swarm(1, base=base) as swarm:
            config = NodeConfig(
                data_dir=tmp_path / "f",
                serve_models=frozenset({"digits-logreg"}),
                bootstrap=(swarm[0].addrs[0],),
                target_degree=0,
                shutdown_grace=1.0,
                fetch=FetchConfig(models=(target,)),
            )
            async with open_node(config) as node:
                progress = await node.fetches.wait_ended(target)
                assert progress.state == "done"
                card = node.executor.models.card(progress.model_id)
                assert card is not None and card.stage is not None  # type: ignore[attr-defined]
                assert (card.stage.parent, card.stage.index) == (MINILM, 1)  # type: ignore[attr-defined]
                assert sorted(node.executor.models.ids()) == ["digits-logreg", progress.model_id]
