"""`p2p-node demo --stages`: models bigger than any node, served through stages.

The bundled generator pydoc-gpt-large runs as its shipped 3-stage split,
and MiniLM as its shipped 2-stage split (`p2p_node/bundled_stages`). Each runs on a network of its
own: one coordinator and one node per stage, every node's model memory budget
below the whole model, so that no node could load it. The coordinator places a
chain (one peer per stage), and the activations go stage peer to stage peer.
Each answer is checked against the whole model run in this process.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import trio
from tokenizers import Tokenizer

from ._config import ExecutorConfig, NodeConfig
from ._repository import bundled_models_dir, read_model_card
from ._shard import copy_bundled_stages, stage_id
from .testing import open_swarm

GENERATOR = "pydoc-gpt-large"
EMBEDDER = "minilm-l6-v2"
PROMPT = "The module"
SENTENCES = (
    "A node runs the model on its own machine.",
    "The model is run locally by one of the peers.",
    "Bake the bread for forty minutes.",
)
CONVERGE_TIMEOUT_S = 30.0
Row = tuple[str, ...]


def _short(peer_id: str) -> str:
    return f"…{peer_id[-6:]}"


async def run_stage_demo() -> tuple[list[str], list[Row]]:
    """Notes and table rows: one generation and one embedding, each through a chain."""
    notes: list[str] = []
    rows: list[Row] = [("job", "model", "chain (stage: peer)", "result", "latency")]
    with tempfile.TemporaryDirectory(prefix="p2p-node-stages-") as tmp:
        root = Path(tmp)
        for model, k in ((GENERATOR, 3), (EMBEDDER, 2)):
            copy_bundled_stages(model, k, root / "repo")  # the shipped split
            whole_mb = read_model_card(bundled_models_dir() / model).memory_bytes / (1 << 20)
            stages_mb = [
                read_model_card(root / "repo" / stage_id(model, i, k)).memory_bytes / (1 << 20)
                for i in range(k)
            ]
            budget = round(max(stages_mb) * 1.05, 2)
            assert budget < whole_mb
            notes.append(
                f"{model}: whole {whole_mb:.1f} MB; {k} stages of "
                + ", ".join(f"{mb:.1f}" for mb in stages_mb)
                + f" MB; every node's --model-memory-mb {budget:g}"
            )
            base = NodeConfig(
                data_dir=root / model,
                shutdown_grace=1.0,
                target_degree=0,
                models_dir=root / "repo",
                executor=ExecutorConfig(model_memory_mb=budget),
            )
            models: list[frozenset[str] | None] = [frozenset()]
            models += [frozenset({stage_id(model, i, k)}) for i in range(k)]
            async with open_swarm(k + 1, models=models, base=replace(base)) as swarm:
                with trio.fail_after(CONVERGE_TIMEOUT_S):
                    await swarm.wait_converged()
                    while True:
                        try:
                            plan = swarm[0].chains.plan(model)
                            break
                        except Exception:
                            await trio.sleep(0.05)
                chain = " ".join(f"{h.index + 1}:{_short(h.peer_id)}" for h in plan.hops)
                started = trio.current_time()
                if model == GENERATOR:
                    result = await _generate(swarm[0].chains, model)
                else:
                    result = await _embed(swarm[0].chains, model)
                ms = (trio.current_time() - started) * 1e3
                rows.append((str(len(rows)), model, chain, result, f"{ms:.1f} ms"))
    return notes, rows


async def _generate(chains: Any, model: str) -> str:
    tokenizer = Tokenizer.from_file(str(bundled_models_dir() / model / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT).ids
    tokens = [t async for t in chains.generate(model, prompt, 16)]
    whole = _greedy_whole(model, prompt, len(tokens))
    same = "same as whole" if tokens == whole else "DIFFERS from whole"
    return f"{len(tokens)} tokens, {same}: {PROMPT}{tokenizer.decode(tokens)!r}"[:72]


async def _embed(chains: Any, model: str) -> str:
    tokenizer = Tokenizer.from_file(str(bundled_models_dir() / model / "tokenizer.json"))
    encoded = [tokenizer.encode(s).ids for s in SENTENCES]
    width = max(map(len, encoded))
    ids = np.zeros((len(encoded), width), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = e, 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    staged = (await chains.run(model, feeds))["sentence_embedding"]
    session = ort.InferenceSession(
        str(bundled_models_dir() / model / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    whole = session.run(["sentence_embedding"], feeds)[0]
    error = float(np.abs(staged - whole).max())
    alike, unlike = float(staged[0] @ staged[1]), float(staged[0] @ staged[2])
    return f"cosine {alike:.2f} alike, {unlike:.2f} not; max |staged - whole| {error:.1e}"


def _greedy_whole(model: str, prompt: list[int], steps: int) -> list[int]:
    from ._decoder import PAST_PREFIX, PRESENT_PREFIX
    from ._stages import empty_past

    session = ort.InferenceSession(
        str(bundled_models_dir() / model / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    past = empty_past(session, 1)
    ids, tokens = list(prompt), []
    position = 0
    for _ in range(steps):
        n = len(ids)
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, position + n), np.int64),
            "position_ids": np.arange(position, position + n, dtype=np.int64)[None],
            **past,
        }
        out = dict(zip(names, session.run(names, feeds), strict=True))
        past = {
            PAST_PREFIX + k[len(PRESENT_PREFIX) :]: v
            for k, v in out.items()
            if k.startswith(PRESENT_PREFIX)
        }
        position += n
        tokens.append(int(np.argmax(out["logits"][0, -1])))
        ids = [tokens[-1]]
    return tokens
