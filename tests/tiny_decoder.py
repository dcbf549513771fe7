"""A tiny decoder LM in Hugging Face Optimum's decoder layout, for tests and benchmarks.

One attention block with random (seeded) weights over a byte-level vocabulary:
no training, so its text is noise, but its graph has the inputs and outputs of an
exported GPT-2 and honours `attention_mask` over past and new positions, so
sessions of different lengths can share a left-padded batch::

    inputs   input_ids                int64   [batch, seq]
             attention_mask           int64   [batch, past + seq]
             position_ids             int64   [batch, seq]
             past_key_values.{i}.key  float32 [batch, heads, past, head_dim]
             past_key_values.{i}.value
    outputs  logits                   float32 [batch, seq, vocab]
             present.{i}.key          float32 [batch, heads, past + seq, head_dim]
             present.{i}.value

`write_tiny_decoder(models_dir)` writes `<models_dir>/<id>/` with model.onnx,
tokenizer.json, model.toml and the `[text]` table, as the bundled generators have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

MODEL_ID = "tiny-decoder"
LAYERS = 1
HEADS = 2
HEAD_DIM = 8
CONTEXT = 128
EOS = 0  # the first byte-level symbol; rare enough in random weights' choices


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, any UTF-8 text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tiny_decoder(
    vocab: int,
    *,
    seed: int = 0,
    layers: int = LAYERS,
    context: int = CONTEXT,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    d = heads * head_dim

    def weight(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)
        return numpy_helper.from_array(value, name)

    inits = [
        weight("wte", vocab, d, scale=np.sqrt(vocab)),
        weight("wpe", context, d, scale=np.sqrt(CONTEXT)),
        weight("lm_head", d, vocab, scale=4.0),
        numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge_heads"),
        numpy_helper.from_array(np.array(1 / np.sqrt(head_dim), np.float32), "scale"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "masked"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["wte", "input_ids"], ["tok"]),
        n("Gather", ["wpe", "position_ids"], ["pos"]),
        n("Add", ["tok", "pos"], ["h0"]),
        # The mask: key j is seen by query i (at past + i) when j <= past + i and
        # attention_mask[j] is 1.  [batch, 1, seq, total]
        n("Shape", ["attention_mask"], ["mask_shape"]),
        n("Gather", ["mask_shape", "one"], ["total"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "one"], ["seq"]),
        n("Sub", ["total", "seq"], ["past"]),
        n("Range", ["past", "total", "one"], ["q_index"]),
        n("Range", ["zero", "total", "one"], ["k_index"]),
        n("Unsqueeze", ["q_index", "axis1"], ["q_column"]),
        n("LessOrEqual", ["k_index", "q_column"], ["causal"]),  # [seq, total]
        n("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
        n("Unsqueeze", ["mask_bool", "axes12"], ["mask_4d"]),  # [batch, 1, 1, total]
        n("And", ["causal", "mask_4d"], ["visible"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    kv_shape = ["batch", heads, "past", head_dim]
    present_shape = ["batch", heads, "total", head_dim]
    h = "h0"
    for i in range(layers):
        inits += [weight(f"w{x}{i}", d, d) for x in "qkvo"]
        inits += [weight(f"up{i}", d, 4 * d), weight(f"down{i}", 4 * d, d)]
        for x in "qkv":
            nodes += [
                n("MatMul", [h, f"w{x}{i}"], [f"{x}{i}_flat"]),
                n("Reshape", [f"{x}{i}_flat", "split_heads"], [f"{x}{i}_heads"]),
                n("Transpose", [f"{x}{i}_heads"], [f"{x}{i}_new"], perm=[0, 2, 1, 3]),
            ]
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        nodes += [
            n("Concat", [past_k, f"k{i}_new"], [present_k], axis=2),
            n("Concat", [past_v, f"v{i}_new"], [present_v], axis=2),
            n("Transpose", [present_k], [f"kt{i}"], perm=[0, 1, 3, 2]),
            n("MatMul", [f"q{i}_new", f"kt{i}"], [f"raw{i}"]),
            n("Mul", [f"raw{i}", "scale"], [f"scaled{i}"]),
            n("Where", ["visible", f"scaled{i}", "masked"], [f"scores{i}"]),
            n("Softmax", [f"scores{i}"], [f"probs{i}"], axis=-1),
            n("MatMul", [f"probs{i}", present_v], [f"ctx{i}"]),
            n("Transpose", [f"ctx{i}"], [f"ctx{i}_t"], perm=[0, 2, 1, 3]),
            n("Reshape", [f"ctx{i}_t", "merge_heads"], [f"ctx{i}_flat"]),
            n("MatMul", [f"ctx{i}_flat", f"wo{i}"], [f"attn{i}"]),
            n("Add", [h, f"attn{i}"], [f"mid{i}"]),
            n("MatMul", [f"mid{i}", f"up{i}"], [f"up{i}_out"]),
            n("Relu", [f"up{i}_out"], [f"act{i}"]),
            n("MatMul", [f"act{i}", f"down{i}"], [f"mlp{i}"]),
            n("Add", [f"mid{i}", f"mlp{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
        inputs += [
            helper.make_tensor_value_info(past_k, TensorProto.FLOAT, kv_shape),
            helper.make_tensor_value_info(past_v, TensorProto.FLOAT, kv_shape),
        ]
        outputs += [
            helper.make_tensor_value_info(present_k, TensorProto.FLOAT, present_shape),
            helper.make_tensor_value_info(present_v, TensorProto.FLOAT, present_shape),
        ]
    nodes.append(n("MatMul", [h, "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_decoder(
    models_dir: Path,
    model_id: str = MODEL_ID,
    *,
    seed: int = 0,
    context: int = CONTEXT,
    layers: int = LAYERS,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
    memory_mb: float | None = None,
) -> Path:
    """`<models_dir>/<model_id>/` holding the tiny decoder as a served text generator,
    with a context window of `context` tokens."""
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab_size()
    model_dir = models_dir / model_id
    model_dir.mkdir(parents=True, exist_ok=True)
    graph = tiny_decoder(
        vocab, seed=seed, layers=layers, context=context, heads=heads, head_dim=head_dim
    )
    onnx.save(graph, model_dir / "model.onnx")
    tokenizer.save(str(model_dir / "tokenizer.json"))
    memory = "" if memory_mb is None else f"memory_mb = {memory_mb}\n"
    (model_dir / "model.toml").write_text(
        f'id = "{model_id}"\nversion = "0.1.0"\ntask_type = "text-generation"\n'
        f'languages = ["en"]\nmax_input_length = {context}\naccuracy = 0.1\ncost = 1.0\n'
        f'description = "a random-weight decoder for tests"\n{memory}'
        f'[text]\ntokenizer = "tokenizer.json"\nmax_tokens = {context}\ntruncation = false\n'
        f'postprocess = "generate"\n\n[text.inputs]\ninput_ids = "input_ids"\n'
        f'attention_mask = "attention_mask"\nposition_ids = "position_ids"\n\n'
        f"[text.decoder]\nlayers = {layers}\nheads = {heads}\n"
        f"head_dim = {head_dim}\nvocab_size = {vocab}\nbos_token_id = {EOS}\n"
        f"eos_token_id = {EOS}\npad_token_id = {EOS}\n"
    )
    return model_dir
