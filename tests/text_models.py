"""Small text models written into a test's model directory: a word-level tokenizer
(the `tokenizers` library) and ONNX graphs built with `onnx.helper`, so that text
jobs are tested without shipping model files. And MiniLM's files, when the
repository bundles them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import trio
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from p2p_node import bundled_models_dir
from p2p_node._node import Node
from scheduler import JobError

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "in",
    "park",
    "runs",
    "fast",
    "slow",
    "good",
    "bad",
    "movie",
    "film",
    "was",
    "is",
    "very",
    "not",
    "great",
    "awful",
    "day",
    "night",
    "sun",
    "moon",
]
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
HIDDEN = 8
MINILM = "minilm-l6-v2"


def write_tokenizer(path: Path) -> Tokenizer:
    vocab = {token: i for i, token in enumerate((*SPECIALS, *WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tokenizer.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(path))
    return tokenizer


def embedding_table(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(SPECIALS) + len(WORDS), HIDDEN)).astype(np.float32)


def encoder_graph(table: np.ndarray, *, classes: int = 0, seed: int = 0) -> onnx.ModelProto:
    """hidden = table[input_ids] * attention_mask: per-token states [b, s, HIDDEN]; with
    `classes`, logits = sum over tokens of hidden @ W [b, classes] instead."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["hidden"]),
    ]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1]), "last"),
    ]
    if classes:
        w = np.random.default_rng(seed + 1).standard_normal((HIDDEN, classes)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1]), "seq_axis"),
        ]
        nodes += [
            helper.make_node("ReduceSum", ["hidden", "seq_axis"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ]
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    else:
        nodes[-1] = helper.make_node("Mul", ["tokens", "mask3"], ["last_hidden_state"])
        out = helper.make_tensor_value_info(
            "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN]
        )
    graph = helper.make_graph(nodes, "text", [ids, mask], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_text_model(
    root: Path,
    model_id: str,
    *,
    max_tokens: int,
    truncation: bool = False,
    classes: tuple[str, ...] = (),
    task_type: str = "sentence-embedding",
    accuracy: float = 0.8,
    cost: float = 1.0,
    seed: int = 0,
) -> Path:
    model_dir = root / model_id
    model_dir.mkdir(parents=True)
    write_tokenizer(model_dir / "tokenizer.json")
    graph = encoder_graph(embedding_table(seed), classes=len(classes), seed=seed)
    onnx.save(graph, model_dir / "model.onnx")
    post = "labels" if classes else "mean_pool_normalize"
    labels = f"labels = {list(classes)!r}\n".replace("'", '"') if classes else ""
    (model_dir / "model.toml").write_text(
        f'id = "{model_id}"\nversion = "1"\ntask_type = "{task_type}"\nlanguages = ["en"]\n'
        f"max_input_length = {max_tokens}\naccuracy = {accuracy}\ncost = {cost}\n"
        f'[text]\ntokenizer = "tokenizer.json"\nmax_tokens = {max_tokens}\n'
        f'truncation = {"true" if truncation else "false"}\npostprocess = "{post}"\n{labels}'
        '[text.inputs]\ninput_ids = "input_ids"\nattention_mask = "attention_mask"\n',
        encoding="utf-8",
    )
    return model_dir


def bundled_minilm() -> Path | None:
    """MiniLM's directory in the bundled models, None until it is bundled."""
    found = bundled_models_dir() / MINILM
    return (
        found if (found / "model.toml").is_file() and (found / "tokenizer.json").is_file() else None
    )


def copy_minilm(source: Path, root: Path, model_id: str, max_tokens: int | None = None) -> Path:
    """MiniLM under `model_id` (its ONNX file linked, not copied), its windows set to
    `max_tokens` when given."""
    model_dir = root / model_id
    model_dir.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == "model.toml":
            continue
        if item.is_file():
            (model_dir / item.name).symlink_to(item)
        else:
            shutil.copytree(item, model_dir / item.name)
    toml = (source / "model.toml").read_text(encoding="utf-8")
    lines = []
    for line in toml.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "id":
            line = f'id = "{model_id}"'
        elif key in ("max_input_length", "max_tokens") and max_tokens is not None:
            line = f"{key} = {max_tokens}"
        lines.append(line)
    (model_dir / "model.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_dir


async def wait_for_chains(node: Node, *parents: str) -> None:
    """Until `node`'s view holds a complete chain of stages of each of `parents`."""
    for parent in parents:
        while True:
            try:
                node.chains.plan(parent)
                break
            except JobError:
                await trio.sleep(0.05)
