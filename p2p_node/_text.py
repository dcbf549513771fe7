"""Text jobs on the node that runs them: a model's `[text]` table, its tokenizer, the
feeds its graph takes, and what its outputs become.

Text is tokenized where it runs (DESIGN.md, "Next: text"): a job carries strings,
and the executing node encodes them with the model's own `tokenizer.json`, padded
to the longest text of the job and truncated (or refused) at the model's
`max_tokens`, as its `model.toml` says:

    [text]
    tokenizer = "tokenizer.json"
    max_tokens = 256
    truncation = true
    postprocess = "mean_pool_normalize"    # or "labels", or "generate"
    labels = ["negative", "positive"]       # "labels" only: one name per class
    [text.inputs]                           # graph input = tokenizer output
    input_ids = "input_ids"
    attention_mask = "attention_mask"
    token_type_ids = "token_type_ids"

Postprocessing: `mean_pool_normalize` answers `embeddings` (float32 [texts,
hidden], unit length): the graph's first output mean-pooled over the attention
mask and L2-normalised when it is per token, as it is when it already pools.
`labels` answers `label` (int64 per text), `probabilities` (softmax of the
first output unless the graph names one `probabilities`) and the label names.
`generate` belongs to generation sessions, not to these one-shot jobs.
Pure but for reading the tokenizer file: no trio, no onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gossip import ModelDescriptor
from scheduler import ErrorCode, JobError

from ._repository import ModelCard, Postprocess, RepositoryError, TextSpec

EMBEDDINGS_OUTPUT = "embeddings"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"


@dataclass(frozen=True, slots=True)
class TextJob:
    """One text job's feeds, the graph outputs it needs, and how to answer from them."""

    feeds: dict[str, np.ndarray[Any, Any]]
    wanted: tuple[str, ...]
    attention_mask: np.ndarray[Any, Any]
    model: TextModel

    def finish(
        self, outputs: Mapping[str, np.ndarray[Any, Any]]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[str, ...]]:
        """The job's outputs and label names from the graph's outputs."""
        return self.model.finish(outputs, self.attention_mask)


class TextModel:
    """A served model's tokenizer and `[text]` table, checked against its graph."""

    def __init__(self, descriptor: ModelDescriptor, spec: TextSpec, tokenizer: Tokenizer) -> None:
        self.descriptor = descriptor
        self.spec = spec
        self._tokenizer = tokenizer
        # the same, cutting each text to the window: never one tokenizer switched back
        # and forth, which a job in another thread could catch half way
        self._cutting = Tokenizer.from_str(tokenizer.to_str())
        self._cutting.enable_truncation(max_length=spec.max_tokens)
        self._output = _checked_output(descriptor, spec)

    @classmethod
    def load(cls, card: ModelCard, descriptor: ModelDescriptor) -> TextModel | None:
        """`card`'s text model, None for a plain tensor model. RepositoryError when its
        table, its tokenizer or its graph's inputs do not fit together."""
        spec = card.text
        if spec is None:
            return None
        path = spec.tokenizer_path
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own untyped Exception
            raise RepositoryError(
                f"{path}: not a tokenizer.json `tokenizers` reads: {error}"
            ) from None
        return cls.with_tokenizer(descriptor, spec, tokenizer)

    @classmethod
    def with_tokenizer(
        cls, descriptor: ModelDescriptor, spec: TextSpec, tokenizer: Tokenizer
    ) -> TextModel:
        """A text model around `tokenizer` as read (e.g. one fetched from a peer; this
        sets its truncation and padding)."""
        tokenizer.no_truncation()  # this module truncates, to max_tokens, when allowed
        padding = tokenizer.padding or {}
        tokenizer.enable_padding(
            pad_id=padding.get("pad_id", 0),
            pad_type_id=padding.get("pad_type_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
        )  # to the longest text of each job
        return cls(descriptor, spec, tokenizer)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """The most tokens any of `texts` takes, special tokens included."""
        return max(len(e.ids) for e in self._tokenizer.encode_batch(list(texts)))

    def prepare(self, texts: Sequence[str], *, truncate: bool, max_rows: int) -> TextJob:
        """The feeds for `texts`, or INVALID_INPUT naming the limit they break."""
        model_id, spec = self.descriptor.id, self.spec
        if spec.postprocess is Postprocess.GENERATE:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {model_id} generates text: run it as a generation, not a one-shot job",
            )
        check_texts(model_id, texts, max_rows)
        encodings = self._tokenizer.encode_batch(list(texts))
        limit = spec.max_tokens
        longest = max(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        if len(encodings[longest].ids) > limit:
            if not (spec.truncation or truncate):
                raise JobError(
                    ErrorCode.INVALID_INPUT,
                    f"model {model_id}: text {longest} is {len(encodings[longest].ids)} tokens, "
                    f"more than its limit of {limit} (max_tokens; its truncation is off): "
                    "shorten it, or allow truncation (context truncate=true)",
                )
            encodings = self._cutting.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        made = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape),
        }
        dtypes = {s.name: s.dtype for s in self.descriptor.inputs}
        feeds = {graph: made[ours].astype(dtypes[graph], copy=False) for graph, ours in spec.inputs}
        return TextJob(feeds, (self._output,), mask, self)

    def finish(
        self, outputs: Mapping[str, np.ndarray[Any, Any]], mask: np.ndarray[Any, Any]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[str, ...]]:
        value = np.asarray(outputs[self._output], dtype=np.float32)
        rows = mask.shape[0]
        if value.shape[:1] != (rows,):
            raise JobError(
                ErrorCode.INTERNAL,
                f"model {self.descriptor.id}: output {self._output!r} has shape "
                f"{list(value.shape)} for {rows} texts",
            )
        if self.spec.postprocess is Postprocess.MEAN_POOL_NORMALIZE:
            return {EMBEDDINGS_OUTPUT: mean_pool_normalize(value, mask)}, ()
        return self._labels(value)

    def _labels(
        self, value: np.ndarray[Any, Any]
    ) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[str, ...]]:
        names = self.spec.labels
        if value.ndim != 2 or value.shape[1] != len(names):
            raise JobError(
                ErrorCode.INTERNAL,
                f"model {self.descriptor.id}: output {self._output!r} has shape "
                f"{list(value.shape)}, not [texts, {len(names)}] for its {len(names)} labels",
            )
        if self._output == PROBABILITIES_OUTPUT:
            probabilities = value
        else:
            shifted = np.exp(value - value.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        label = np.argmax(value, axis=1).astype(np.int64)
        answer = {LABEL_OUTPUT: label, PROBABILITIES_OUTPUT: probabilities.astype(np.float32)}
        return answer, tuple(names[i] for i in label)


def check_texts(model_id: str, texts: Sequence[str], max_rows: int) -> None:
    """INVALID_INPUT for an empty list, an empty text, or more texts than `max_rows`
    (the wire refuses them too; a job from this node's own API gets here first)."""
    if not texts:
        raise JobError(
            ErrorCode.INVALID_INPUT, f"model {model_id}: a text job needs 1 or more texts"
        )
    empty = next((i for i, t in enumerate(texts) if not t), None)
    if empty is not None:
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"model {model_id}: text {empty} is empty (1 character or more)",
        )
    if len(texts) > max_rows:
        raise JobError(
            ErrorCode.INVALID_INPUT,
            f"model {model_id}: {len(texts)} texts, more than this node's cap of {max_rows} per "
            "request (max_batch_rows); send them in smaller jobs",
        )


def mean_pool_normalize(
    value: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """Per text: the mean over its real tokens (for a per-token output [texts, tokens,
    hidden]), then unit length. An already pooled output [texts, hidden] is only
    normalised (a no-op for a graph that normalises)."""
    if value.ndim == 3:
        weights = mask[:, : value.shape[1], None].astype(np.float32)
        value = (value * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(value, axis=1, keepdims=True)
    return np.asarray(value / np.maximum(norms, 1e-12), dtype=np.float32)


def _checked_output(descriptor: ModelDescriptor, spec: TextSpec) -> str:
    """The graph output the postprocessing reads; RepositoryError if the table names
    graph inputs the graph lacks or leaves some out."""
    graph_inputs = {s.name for s in descriptor.inputs}
    mapped = {graph for graph, _ in spec.inputs}
    if spec.postprocess is not Postprocess.GENERATE and mapped != graph_inputs:
        raise RepositoryError(
            f"model {descriptor.id}: [text.inputs] feeds {sorted(mapped)}; "
            f"its graph takes {sorted(graph_inputs)}"
        )
    names = [s.name for s in descriptor.outputs]
    if spec.postprocess is Postprocess.LABELS and PROBABILITIES_OUTPUT in names:
        return PROBABILITIES_OUTPUT
    return names[0]


class TextModels:
    """The text models a node serves, by id, loaded once at start."""

    def __init__(self, models: Iterable[TextModel] = ()) -> None:
        self._by_id = {m.descriptor.id: m for m in models}

    @classmethod
    def load(cls, models: Iterable[tuple[ModelCard, ModelDescriptor]]) -> TextModels:
        found = (TextModel.load(card, descriptor) for card, descriptor in models)
        return cls(m for m in found if m is not None)

    def get(self, model_id: str) -> TextModel | None:
        return self._by_id.get(model_id)

    def ids(self) -> list[str]:
        return sorted(self._by_id)

    def count_tokens(self, model_id: str, texts: Sequence[str]) -> int | None:
        """The most tokens any of `texts` takes in `model_id`'s tokenizer; None when this
        node does not hold that model's tokenizer."""
        model = self._by_id.get(model_id)
        return None if model is None or not texts else model.count_tokens(texts)
