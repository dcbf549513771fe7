"""Write a bundled generator's graph with onnxruntime's fused attention.

``tools/gpt.py`` exports each generator with the TorchScript exporter. There,
each layer's attention is some forty small nodes: the q/k/v reshapes and
transposes, the concatenation of the cache, two batched matmuls, the mask's
``Where`` and a softmax. onnxruntime runs each node on its own, and in a
decode step of these small models that per-node cost is most of the step.

This module writes the same model again with one ``com.microsoft``
``MultiHeadAttention`` node per layer (and ``FastGelu`` for the MLP's tanh
GELU). The weights are the same, and so are the inputs and outputs, in Hugging
Face Optimum's decoder layout. ``MultiHeadAttention`` adds the bias to q, k and
v, appends the new keys and values to ``past_key_values`` (the ``present``
outputs), masks the padding from ``attention_mask`` and attends causally
(``unidirectional``), as the export's nodes did.

Logits and caches agree with the export's within 1e-5 at every position the
attention mask keeps (``check_same``). A padded position has no logits that
mean anything in either graph. Greedy tokens are the same, one session alone
or sixteen in a batch.

It reads an export or its own output alike, so running it twice changes
nothing. ``tools/gpt.py`` writes its exports through it.

Run: ``python tools/gpt_fused.py [MODEL_DIR ...]`` (default: the two bundled
generators). It rewrites each ``model.onnx`` in place after checking the new
graph against the old one. It then measures the decode step again and
rewrites ``latency_us`` and ``cost`` in model.toml, and the decode step line
in the README. Needs only onnx, numpy and onnxruntime, not the ``build`` extra.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "p2p_node" / "bundled_models"
GENERATORS = ("pydoc-gpt-small", "pydoc-gpt-large")
OPSET = 17
MS_DOMAIN = "com.microsoft"
CHECK_TOLERANCE = 1e-4
LATENCY_WARMUP = 20
LATENCY_REPEATS = 200

Array = np.ndarray

# A layer's weights by the names the fused graph gives them (after "model.blocks.N.").
# The matrices are MatMul's right-hand side: [in, out], torch's Linear weight transposed.
LAYER_WEIGHTS = (
    "ln1.weight",
    "ln1.bias",
    "attention.qkv.matrix",
    "attention.qkv.bias",
    "attention.proj.matrix",
    "attention.proj.bias",
    "ln2.weight",
    "ln2.bias",
    "mlp.0.matrix",
    "mlp.0.bias",
    "mlp.2.matrix",
    "mlp.2.bias",
)
_MATRICES = tuple(name for name in LAYER_WEIGHTS if name.endswith(".matrix"))


@dataclass(frozen=True)
class GptWeights:
    """A generator's weights, whichever graph they were read from."""

    token_embedding: Array  # [vocab, d]
    position_embedding: Array  # [context, d]
    layers: list[dict[str, Array]]  # LAYER_WEIGHTS of each block
    ln_f: tuple[Array, Array]  # weight, bias
    lm_head: Array  # [d, vocab]: the token embedding, transposed (tied)
    epsilon: float  # the layer norms'

    @property
    def d_model(self) -> int:
        return int(self.token_embedding.shape[1])


def read_weights(model: onnx.ModelProto) -> GptWeights:
    """The weights of `model`: tools/gpt.py's TorchScript export, or `fused_graph`'s.

    In the export, biases and norms keep torch's names, but the matmuls' weights
    are anonymous (``onnx::MatMul_N``). They are taken in graph order, four per
    block (qkv, proj, mlp.0, mlp.2) and then the output projection, and each
    one's shape is checked."""
    graph = model.graph
    named = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    if not norms:
        raise ValueError("no LayerNormalization node: not a tools/gpt.py generator")
    epsilon = next((a.f for a in norms[0].attribute if a.name == "epsilon"), 1e-5)
    layer_count = 1 + max(
        int(m.group(1)) for name in named if (m := re.match(r"model\.blocks\.(\d+)\.", name))
    )
    anonymous = [
        named[n.input[1]]
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in named and not n.input[1].startswith("model.")
    ]
    if anonymous and len(anonymous) != 4 * layer_count + 1:
        raise ValueError(f"{len(anonymous)} weight matmuls for {layer_count} blocks")
    layers = []
    for i in range(layer_count):
        prefix = f"model.blocks.{i}."
        layer = {}
        for name in LAYER_WEIGHTS:
            if name in _MATRICES and anonymous:
                layer[name] = anonymous[4 * i + _MATRICES.index(name)]
            else:
                layer[name] = named[prefix + name]
        layers.append(layer)
    token = named["model.token_embedding.weight"]
    lm_head = anonymous[-1] if anonymous else named["model.lm_head.matrix"]
    weights = GptWeights(
        token,
        named["model.position_embedding.weight"],
        layers,
        (named["model.ln_f.weight"], named["model.ln_f.bias"]),
        lm_head,
        float(epsilon),
    )
    _check_shapes(weights)
    return weights


def _check_shapes(w: GptWeights) -> None:
    d = w.d_model
    want = {
        "attention.qkv.matrix": (d, 3 * d),
        "attention.proj.matrix": (d, d),
        "mlp.0.matrix": (d, 4 * d),
        "mlp.2.matrix": (4 * d, d),
    }
    for i, layer in enumerate(w.layers):
        for name, shape in want.items():
            if layer[name].shape != shape:
                raise ValueError(f"block {i} {name}: shape {layer[name].shape}, not {shape}")
    if not np.array_equal(w.lm_head, w.token_embedding.T):
        raise ValueError("the output projection is not the token embedding (tied) transposed")


def fused_graph(w: GptWeights, heads: int, like: onnx.ModelProto) -> onnx.ModelProto:
    """The generator of `w` with one MultiHeadAttention node per block; its inputs
    and outputs are `like`'s (names, types and symbolic shapes)."""
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    # Every tensor's type: onnx's shape inference knows no com.microsoft operator,
    # and `p2p-node shard` types the tensors crossing between stages from these.
    infos: list[onnx.ValueInfoProto] = []
    rows = ["batch_size", "sequence_length"]
    d = w.d_model

    def weight(name: str, value: Array) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def typed(name: str, width: int) -> None:
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [*rows, width]))

    def node(
        op: str, inputs: Sequence[str], outputs: Sequence[str], width: int | None = d, **attrs: Any
    ) -> None:
        """A node; each output typed float [batch, seq, width] (None: typed elsewhere)."""
        domain = MS_DOMAIN if op in ("MultiHeadAttention", "FastGelu") else ""
        name = f"{outputs[0]}/{op}"
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        if width is not None:
            for out in outputs:
                typed(out, width)

    def norm(x: str, prefix: str, out: str) -> str:
        scale, bias = f"{prefix}.weight", f"{prefix}.bias"
        node("LayerNormalization", [x, scale, bias], [out], axis=-1, epsilon=w.epsilon)
        return out

    weight("model.token_embedding.weight", w.token_embedding)
    weight("model.position_embedding.weight", w.position_embedding)
    node("Gather", ["model.token_embedding.weight", "input_ids"], ["tokens"])
    node("Gather", ["model.position_embedding.weight", "position_ids"], ["positions"])
    node("Add", ["tokens", "positions"], ["embedded"])
    node("Cast", ["attention_mask"], ["key_padding_mask"], None, to=TensorProto.INT32)
    total = "past_sequence_length + sequence_length"
    mask = helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, [rows[0], total])
    infos.append(mask)
    inits.append(numpy_helper.from_array(np.array([d, d, d], np.int64), "qkv_split"))
    x = "embedded"
    for i, layer in enumerate(w.layers):
        p = f"model.blocks.{i}"
        for name, value in layer.items():
            weight(f"{p}.{name}", value)
        h = norm(x, f"{p}.ln1", f"{p}.ln1.out")
        node("MatMul", [h, f"{p}.attention.qkv.matrix"], [f"{p}.qkv"], 3 * d)
        node("Split", [f"{p}.qkv", "qkv_split"], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1)
        node(
            "MultiHeadAttention",
            [
                f"{p}.q",
                f"{p}.k",
                f"{p}.v",
                f"{p}.attention.qkv.bias",
                "key_padding_mask",
                "",  # attention_bias
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
            ],
            [f"{p}.attended", f"present.{i}.key", f"present.{i}.value"],
            None,  # the presents are graph outputs
            num_heads=heads,
            unidirectional=1,
        )
        typed(f"{p}.attended", d)
        node("MatMul", [f"{p}.attended", f"{p}.attention.proj.matrix"], [f"{p}.proj"])
        node("Add", [f"{p}.proj", f"{p}.attention.proj.bias"], [f"{p}.proj.out"])
        node("Add", [x, f"{p}.proj.out"], [f"{p}.mid"])
        h = norm(f"{p}.mid", f"{p}.ln2", f"{p}.ln2.out")
        node("MatMul", [h, f"{p}.mlp.0.matrix"], [f"{p}.mlp.0"], 4 * d)
        node("Add", [f"{p}.mlp.0", f"{p}.mlp.0.bias"], [f"{p}.mlp.0.out"], 4 * d)
        node("FastGelu", [f"{p}.mlp.0.out"], [f"{p}.gelu"], 4 * d)  # GELU, tanh form
        node("MatMul", [f"{p}.gelu", f"{p}.mlp.2.matrix"], [f"{p}.mlp.2"])
        node("Add", [f"{p}.mlp.2", f"{p}.mlp.2.bias"], [f"{p}.mlp.2.out"])
        x = f"{p}.out"  # (named for its block: `p2p-node shard` cuts after it)
        node("Add", [f"{p}.mid", f"{p}.mlp.2.out"], [x])
    weight("model.ln_f.weight", w.ln_f[0])
    weight("model.ln_f.bias", w.ln_f[1])
    weight("model.lm_head.matrix", w.lm_head)
    norm(x, "model.ln_f", "final.norm")
    node("MatMul", ["final.norm", "model.lm_head.matrix"], ["logits"], None)  # an output
    graph = helper.make_graph(
        nodes,
        like.graph.name or "gpt",
        list(like.graph.input),
        list(like.graph.output),
        inits,
        value_info=infos,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tools/gpt_fused.py")
    model.ir_version = like.ir_version
    return model


def fuse(onnx_bytes: bytes, heads: int) -> bytes:
    """`onnx_bytes` (an export or a fused graph) as a fused graph, serialized."""
    model = onnx.load_from_string(onnx_bytes)
    return fused_graph(read_weights(model), heads, model).SerializeToString()


# --------------------------------------------------------------------- checks


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def check_feeds(
    layers: int, heads: int, head_dim: int, vocab: int, seed: int = 0
) -> list[dict[str, Array]]:
    """Prefills and steps to compare two graphs on: past 0 and past > 0, one new
    token and several, rows left-padded by different amounts."""
    rng = np.random.default_rng(seed)
    cases = []
    for rows, past, seq in ((1, 0, 9), (3, 0, 7), (1, 20, 1), (16, 40, 1), (4, 10, 3)):
        mask = np.ones((rows, past + seq), np.int64)
        for row in range(1, rows):
            mask[row, : min(row * 2, past + seq - 1)] = 0
        feeds = {
            "input_ids": rng.integers(1, vocab, (rows, seq)).astype(np.int64),
            "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:],
        }
        for i in range(layers):
            for kind in ("key", "value"):
                shape = (rows, heads, past, head_dim)
                feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape, np.float32)
        cases.append(feeds)
    return cases


def check_same(old: bytes, new: bytes, layers: int, heads: int, head_dim: int) -> float:
    """The largest difference between `old`'s and `new`'s outputs over `check_feeds`,
    at the positions the mask keeps; raises past CHECK_TOLERANCE."""
    a, b = session(old), session(new)
    vocab = len(read_weights(onnx.load_from_string(new)).token_embedding)
    worst = 0.0
    for feeds in check_feeds(layers, heads, head_dim, vocab):
        kept = feeds["attention_mask"] > 0
        seq = feeds["input_ids"].shape[1]
        names = [o.name for o in a.get_outputs()]
        for name, x, y in zip(names, a.run(None, feeds), b.run(None, feeds), strict=True):
            if name == "logits":
                error = np.abs(x - y)[kept[:, -seq:]].max()
            else:  # [rows, heads, past + seq, head_dim]
                error = np.abs(x - y).transpose(0, 2, 1, 3)[kept].max()
            worst = max(worst, float(error))
    if not worst <= CHECK_TOLERANCE:
        raise RuntimeError(f"the fused graph differs from the old one by {worst:.2e}")
    return worst


def decode_latency_us(
    onnx_bytes: bytes, layers: int, heads: int, head_dim: int, past: int
) -> float:
    """Median time of one decode step at batch 1 with a cache of `past` positions,
    one thread (a model.toml's `latency_us`)."""
    run = session(onnx_bytes).run
    feeds = {
        "input_ids": np.zeros((1, 1), np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.full((1, 1), past, np.int64),
    }
    shape = (1, heads, past, head_dim)
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(shape, np.float32)
    for _ in range(LATENCY_WARMUP):
        run(None, feeds)
    times = []
    for _ in range(LATENCY_REPEATS):
        started = time.perf_counter_ns()
        run(None, feeds)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000.0


# ----------------------------------------------------------------------- main


def _decoder(model_dir: Path) -> tuple[dict[str, int], int]:
    with (model_dir / "model.toml").open("rb") as f:
        text = tomllib.load(f)["text"]
    return text["decoder"], text["max_tokens"]


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    dirs = [Path(a) for a in args] or [MODELS / g for g in GENERATORS]
    latency = {}
    for model_dir in dirs:
        decoder, context = _decoder(model_dir)
        shape = decoder["layers"], decoder["heads"], decoder["head_dim"]
        old = (model_dir / "model.onnx").read_bytes()
        new = fuse(old, decoder["heads"])
        worst = check_same(old, new, *shape)
        (model_dir / "model.onnx").write_bytes(new)
        before = decode_latency_us(old, *shape, context // 2)
        latency[model_dir] = decode_latency_us(new, *shape, context // 2)
        print(
            f"{model_dir.name}: largest difference {worst:.1e}; decode step "
            f"{before:.0f} us before, {latency[model_dir]:.0f} us now"
        )
    fastest = min(latency.values())
    for model_dir, us in latency.items():
        toml = model_dir / "model.toml"
        text = re.sub(r"(?m)^latency_us = .*$", f"latency_us = {us:.1f}", toml.read_text())
        text = re.sub(r"(?m)^cost = .*$", f"cost = {round(us / fastest, 2)}", text)
        toml.write_text(text)
        readme = model_dir / "README.md"
        line = f"| decode step | {us:.0f} us,"
        readme.write_text(re.sub(r"\| decode step \| \d+ us,", line, readme.read_text()))


if __name__ == "__main__":
    main()
