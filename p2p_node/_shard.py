"""Split a model into k stages at layer boundaries: `p2p-node shard`.

A stage is a model too: its own directory, ONNX file and sha256, and a
`[stage]` table in its model.toml naming the parent, its index, k, and the
tensors it takes from the stages before it and hands to the stages after it.

The split works on the graph, not on the builder: each node that uses a
layer's weights (its name or an initializer's name holds ``blocks.N``,
``layer.N``, ``layers.N`` or ``h.N``) belongs to that layer's stage; every other
node runs as late as it can (in the first stage that needs what it computes),
but never before what it reads; nodes computed from constants alone are copied
into each stage that needs them. So a decoder's stage takes the hidden state
(and the attention mask computed from the first stage's inputs) and its own
layers' `past_key_values`, and returns the next hidden state and its own
layers' `present`; the last stage returns the logits. k = 1 writes the whole
graph as a one-stage chain (what `bench.stages` compares against).
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, shape_inference

from ._decoder import PAST_PREFIX, PRESENT_PREFIX
from ._repository import RepositoryError, read_model_card

_LAYER = re.compile(r"(?:^|[./_])(?:blocks|layer|layers|h)[./_](\d+)(?=[./_]|$)")
_PRESENT = re.compile(rf"^{re.escape(PRESENT_PREFIX)}(\d+)\.")
STAGE_SEPARATOR = "@"  # a stage's model id: parent id, "@", index, "of", k


def bundled_stages_dir() -> Path:
    """The bundled generators' and MiniLM's 2- and 3-stage splits (see its README.md)."""
    return Path(str(resources.files("p2p_node") / "bundled_stages"))


def copy_bundled_stages(parent_id: str, k: int, out: Path) -> list[Path]:
    """Copy the shipped k-stage split of `parent_id` under `out`: what `shard` writes."""
    written = []
    for index in range(k):
        sid = stage_id(parent_id, index, k)
        shutil.copytree(bundled_stages_dir() / sid, out / sid, dirs_exist_ok=True)
        written.append(out / sid)
    return written


class ShardError(ValueError):
    """The model cannot be split as asked; the message says why."""


def stage_id(parent_id: str, index: int, k: int) -> str:
    """The model id of stage `index` (0-based) of `k`: ``parent@1of3`` (1-based)."""
    return f"{parent_id}{STAGE_SEPARATOR}{index + 1}of{k}"


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage's graph interface, in the parent's tensor names."""

    index: int
    layers: tuple[int, ...]
    inputs: tuple[str, ...]  # everything the stage's graph takes
    outputs: tuple[str, ...]  # everything it returns
    boundary_in: tuple[str, ...]  # inputs that come from earlier stages
    boundary_out: tuple[str, ...]  # outputs later stages take


def _layer_of(name: str) -> int | None:
    found = [int(m) for m in _LAYER.findall(name)]
    return max(found) if found else None


def plan_stages(model: onnx.ModelProto, k: int) -> tuple[list[StagePlan], list[list[int]]]:
    """Each stage's interface, and each stage's node indices (constant nodes copied)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producer[out] = i
    # Constant nodes: computed from initializers and constants alone.
    constant = [False] * len(nodes)
    for i, node in enumerate(nodes):
        constant[i] = all(
            not name or name in initializers or (name in producer and constant[producer[name]])
            for name in node.input
        )
    own: list[int | None] = []
    for node in nodes:
        layers = [_layer_of(node.name)] + [_layer_of(n) for n in node.input if n in initializers]
        found = [x for x in layers if x is not None]
        own.append(max(found) if found else None)
    layer_ids = sorted({x for i, x in enumerate(own) if x is not None and not constant[i]})
    if not layer_ids:
        raise ShardError("found no layers (no node or weight named blocks.N, layer.N or h.N)")
    if not 1 <= k <= len(layer_ids):
        raise ShardError(
            f"the model has {len(layer_ids)} layers: stages must be 1 to that, got {k}"
        )
    n = len(layer_ids)
    stage_of_layer = {layer: (j * k) // n for j, layer in enumerate(layer_ids)}
    last = k - 1
    # As soon as possible: a node runs no earlier than what it reads.
    low = [0] * len(nodes)
    for i, node in enumerate(nodes):
        if constant[i]:
            continue
        bound = stage_of_layer[own[i]] if own[i] is not None else 0  # type: ignore[index]
        for name in node.input:
            if name in producer and not constant[producer[name]]:
                bound = max(bound, low[producer[name]])
        low[i] = bound
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    outputs = [o.name for o in graph.output]
    stage = list(low)
    for i in reversed(range(len(nodes))):
        if constant[i] or own[i] is not None:
            continue
        wanted: list[int] = []
        for out in nodes[i].output:
            wanted += [stage[c] for c in consumers.get(out, ()) if not constant[c]]
            if out in outputs:
                match = _PRESENT.match(out)
                wanted.append(stage_of_layer.get(int(match[1]), last) if match else last)
        stage[i] = max(low[i], min(wanted)) if wanted else low[i]
    members: list[list[int]] = [[] for _ in range(k)]
    for i in range(len(nodes)):
        if not constant[i]:
            members[stage[i]].append(i)
    # Copy the constant nodes each stage needs (in graph order).
    for s in range(k):
        need: set[int] = set()
        todo = [name for i in members[s] for name in nodes[i].input]
        while todo:
            name = todo.pop()
            p = producer.get(name)
            if p is not None and constant[p] and p not in need:
                need.add(p)
                todo += list(nodes[p].input)
        members[s] = sorted(set(members[s]) | need)
    graph_inputs = [i.name for i in graph.input]
    interfaces: list[tuple[list[str], list[str]]] = []
    for s in range(k):
        produced = {out for i in members[s] for out in nodes[i].output}
        ins: list[str] = []
        for i in members[s]:
            for name in nodes[i].input:
                if name and name not in produced and name not in initializers and name not in ins:
                    ins.append(name)
        later = {name for t in range(s + 1, k) for i in members[t] for name in nodes[i].input}
        made = [out for i in members[s] if not constant[i] for out in nodes[i].output]
        outs = [o for o in outputs if o in made] + [
            o for o in made if o in later and o not in outputs
        ]
        interfaces.append((ins, outs))
    # What crosses each boundary: every input of a later stage but its own cache
    # (stage 0 takes the parent's inputs from the client).
    boundary_in = [
        [] if s == 0 else [x for x in ins if not x.startswith(PAST_PREFIX)]
        for s, (ins, _) in enumerate(interfaces)
    ]
    plans: list[StagePlan] = []
    for s, (ins, outs) in enumerate(interfaces):
        forward: list[str] = []
        made_later = {x for t in range(s + 1, k) for x in interfaces[t][1]}
        for t in range(s + 1, k):
            forward += [x for x in boundary_in[t] if x not in forward and x not in made_later]
        plans.append(
            StagePlan(
                index=s,
                layers=tuple(x for x in layer_ids if stage_of_layer[x] == s),
                inputs=tuple(ins),
                outputs=tuple(outs),
                boundary_in=tuple(boundary_in[s]),
                boundary_out=tuple(forward),
            )
        )
        missing = set(boundary_in[s]) - set(plans[s - 1].boundary_out) if s else set()
        if missing or (s and set(boundary_in[s]) & set(graph_inputs)):
            raise ShardError(f"stage {s + 1} needs {sorted(set(boundary_in[s]))} from before it")
    return plans, members


def split_model(model: onnx.ModelProto, k: int) -> tuple[list[StagePlan], list[onnx.ModelProto]]:
    """The k stage graphs of `model`."""
    plans, members = plan_stages(model, k)
    inferred = shape_inference.infer_shapes(model)
    types: dict[str, onnx.ValueInfoProto] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        types[info.name] = info
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    models = []
    for plan, member in zip(plans, members, strict=True):
        nodes = [graph.node[i] for i in member]
        used = {name for node in nodes for name in node.input}
        for name in (*plan.inputs, *plan.outputs):
            if name not in types or not types[name].type.tensor_type.elem_type:
                raise ShardError(f"cannot tell the type of boundary tensor {name!r}")
        stage_graph = helper.make_graph(
            nodes,
            f"{graph.name}_stage{plan.index}",
            [types[name] for name in plan.inputs],
            [types[name] for name in plan.outputs],
            [initializers[name] for name in sorted(used) if name in initializers],
        )
        internal = {out for node in nodes for out in node.output} - set(plan.outputs)
        stage_graph.value_info.extend(v for v in model.graph.value_info if v.name in internal)
        stage = helper.make_model(
            stage_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version
        )
        onnx.checker.check_model(stage)
        models.append(stage)
    return plans, models


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _toml_table(name: str, table: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    subtables = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append((f"{name}.{key}", value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for sub, value in subtables:
        lines += ["", *_toml_table(sub, value)]
    return lines


def shard(model_dir: Path, k: int, out: Path) -> list[Path]:
    """Write stage directories for the model in `model_dir` under `out`; their paths."""
    card = read_model_card(model_dir)
    with (model_dir / "model.toml").open("rb") as f:
        meta = tomllib.load(f)
    if "stage" in meta:
        raise ShardError(f"{model_dir} is a stage already; shard its parent")
    model = onnx.load(str(card.onnx_path))
    plans, stages = split_model(model, k)
    whole_mb = card.memory_bytes / (1 << 20)
    sizes = [s.ByteSize() for s in stages]
    written = []
    for plan, stage, size in zip(plans, stages, sizes, strict=True):
        sid = stage_id(card.id, plan.index, k)
        directory = out / sid
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(stage, str(directory / "model.onnx"))
        fields = {k_: v for k_, v in meta.items() if not isinstance(v, dict)}
        fields["id"] = sid
        fields["description"] = (
            f"Stage {plan.index + 1} of {k} of {card.id} (layers "
            f"{plan.layers[0]}-{plan.layers[-1]}). " + str(meta.get("description", ""))
        )[:1000]
        fields["memory_mb"] = round(max(whole_mb * size / sum(sizes), 0.01), 3)
        stage_table: dict[str, Any] = {
            "parent": card.id,
            "parent_sha256": card.sha256,
            "index": plan.index,
            "k": k,
            "layers": list(plan.layers),
            "inputs": list(plan.inputs),
            "outputs": list(plan.outputs),
            "boundary_in": list(plan.boundary_in),
            "boundary_out": list(plan.boundary_out),
        }
        if "text" in meta:
            # The parent's [text] table, for the chain's coordinator: a stage alone
            # is no text model, so it is not the stage's own [text].
            stage_table["text"] = meta["text"]
            tokenizer = model_dir / meta["text"].get("tokenizer", "tokenizer.json")
            if tokenizer.is_file():
                (directory / tokenizer.name).write_bytes(tokenizer.read_bytes())
        tables = {"stage": stage_table}
        lines = [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
        for name, table in tables.items():
            lines += ["", *_toml_table(name, table)]
        (directory / "model.toml").write_text("\n".join(lines) + "\n")
        try:
            read_model_card(directory)
        except RepositoryError as error:  # pragma: no cover - a bug here, not the user's
            raise ShardError(f"wrote an unreadable stage: {error}") from None
        written.append(directory)
    return written
