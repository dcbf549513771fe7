"""Turn the fp32 MiniLM graph into the int8 one that ships.

onnxruntime's ``quantize_dynamic`` alone (int8 weights, activations quantized
per tensor at run time) costs this model too much: on the builder's check
sentences its worst cosine to the reference is about 0.975. Two things in BERT
cause it, both measured while building this model:

- A few hidden channels (99, 63, 223, ...) carry values 5-20x the others, so
  one scale per activation tensor leaves the rest few levels. SmoothQuant
  (Xiao et al., 2023) moves that range into the weights: a MatMul ``x W`` becomes
  ``(x / s) (diag(s) W)``, with ``s_j = max|x_j|^a / max|W_j|^(1-a)`` from
  activation maxima on calibration sentences. The product is unchanged in exact
  arithmetic; the division is one elementwise Mul per activation.
- The FFN output projections take the GELU output, whose outliers are per
  token, which no channel scale fixes. Those six MatMuls keep int8 weights
  (per output channel) but run in fp32: ``DequantizeLinear`` then ``MatMul``.

Everything else goes through ``quantize_dynamic`` (per-channel int8 weights),
including the word-embedding Gather that is half the fp32 file.

The weights are unsigned (u8, with a zero point per channel), not signed. With
signed weights onnxruntime's kernel for x86 CPUs without VNNI (AVX2 alone)
multiplies u8 activations by s8 weights with ``vpmaddubsw``, which adds each
pair of products into an int16 and saturates: on such a CPU the s8 graph's
worst cosine to the reference was 0.921 (0.996 on one with VNNI). u8 weights
go through another kernel with no such sum; they gave 0.996 on the AVX2 CPU,
about 8% slower. 7-bit signed weights (``reduce_range``) also avoid it, at
0.995.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

SMOOTH_ALPHA = 0.65
MIN_SCALE_INPUT = 1e-5


def is_ffn_output(node: onnx.NodeProto) -> bool:
    """The FFN output projection of a layer (``encoder.layer.N.output.dense``)."""
    return (
        node.op_type == "MatMul"
        and node.name.endswith(".output.dense.MatMul")
        and (".attention." not in node.name)
    )


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose second input is a weight (an initializer)."""
    weights = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def activation_maxima(
    model: onnx.ModelProto, names: Iterable[str], feeds: Sequence[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel max |value| of the named tensors over the calibration `feeds`."""
    names = list(dict.fromkeys(names))
    probe = copy.deepcopy(model)
    probe.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the same sums, so the same scales, on every build
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        mask = feed["attention_mask"].astype(bool)  # padding is not calibration data
        for name, value in zip(names, session.run(names, feed), strict=True):
            channel_max = np.abs(value[mask]).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, channel_max), channel_max)
    return maxima


def smooth(
    model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], maxima: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """SmoothQuant `nodes` (MatMuls of `model`, by name) with the activation `maxima`.

    MatMuls sharing an input (query, key, value) share one scale, so one Mul
    serves them.
    """
    out = copy.deepcopy(model)
    weights = {init.name: init for init in out.graph.initializer}
    names = {n.name for n in nodes}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in out.graph.node:
        if node.name in names:
            by_input.setdefault(node.input[0], []).append(node)
    muls: dict[str, onnx.NodeProto] = {}
    for x, users in by_input.items():
        w_max = np.max(
            [np.abs(numpy_helper.to_array(weights[u.input[1]])).max(axis=1) for u in users], axis=0
        )
        scale = np.maximum(maxima[x], MIN_SCALE_INPUT) ** SMOOTH_ALPHA / np.maximum(
            w_max, MIN_SCALE_INPUT
        ) ** (1 - SMOOTH_ALPHA)
        inverse = out.graph.initializer.add()
        inverse.CopyFrom(numpy_helper.from_array((1 / scale).astype(np.float32), x + ".smooth"))
        muls[x] = helper.make_node("Mul", [x, inverse.name], [x + ".smoothed"], name=x + ".smooth")
        for user in users:
            weight = weights[user.input[1]]
            scaled = numpy_helper.to_array(weight) * scale[:, None]
            weight.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), weight.name))
            user.input[0] = x + ".smoothed"
    _insert_after_producers(out, muls)
    onnx.checker.check_model(out)
    return out


def int8_weights_only(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> onnx.ModelProto:
    """Store the weights of `nodes` (MatMuls of `model`, by name) as int8 with one
    scale per output column; they are dequantized to fp32 before the MatMul."""
    out = copy.deepcopy(model)
    weights = {init.name: init for init in out.graph.initializer}
    names = {n.name for n in nodes}
    dequantizers: dict[str, onnx.NodeProto] = {}
    for node in out.graph.node:
        if node.name not in names:
            continue
        name = node.input[1]
        weight = numpy_helper.to_array(weights[name])
        scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
        q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        out.graph.initializer.remove(weights[name])
        out.graph.initializer.extend(
            [
                numpy_helper.from_array(q, name + ".int8"),
                numpy_helper.from_array(scale, name + ".scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + ".zero"),
            ]
        )
        dequantizers[name] = helper.make_node(
            "DequantizeLinear",
            [name + ".int8", name + ".scale", name + ".zero"],
            [name + ".fp32"],
            axis=1,
            name=name + ".dequantize",
        )
        node.input[1] = name + ".fp32"
    del_nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend([*dequantizers.values(), *del_nodes])
    onnx.checker.check_model(out)
    return out


def _insert_after_producers(model: onnx.ModelProto, new: dict[str, onnx.NodeProto]) -> None:
    """Put each node of `new` (keyed by its input) right after that input's producer."""
    ordered: list[onnx.NodeProto] = []
    for node in model.graph.node:
        ordered.append(node)
        ordered.extend(new[o] for o in node.output if o in new)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def quantize(
    fp32: onnx.ModelProto, calibration: Sequence[dict[str, np.ndarray]], work: Path
) -> Path:
    """The int8 model, written under `work`: smoothed dynamic int8 MatMuls and Gathers,
    weight-only int8 FFN outputs."""
    matmuls = weight_matmuls(fp32)
    weight_only = [n for n in matmuls if is_ffn_output(n)]
    dynamic = [n for n in matmuls if not is_ffn_output(n)]
    maxima = activation_maxima(fp32, (n.input[0] for n in dynamic), calibration)
    prepared = int8_weights_only(smooth(fp32, dynamic, maxima), weight_only)
    prepared_path, int8_path = work / "prepared.onnx", work / "int8.onnx"
    onnx.save(prepared, prepared_path)
    with _quiet_root_logger():
        quantize_dynamic(
            prepared_path,
            int8_path,
            per_channel=True,
            weight_type=QuantType.QUInt8,  # not QInt8: see the module's docstring
            nodes_to_exclude=[n.name for n in weight_only],
        )
    return int8_path


def quantize_plain(fp32_path: Path, int8_path: Path) -> None:
    """`quantize_dynamic` with its defaults, for comparison: what the shipped graph improves on."""
    with _quiet_root_logger():
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic warns on the root logger; its level is put back after, so that
    the builder run in a test leaves other tests' logging as it was."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
