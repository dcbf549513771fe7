"""Write the bundled 2- and 3-stage splits into ``p2p_node/bundled_stages``.

The generators (``pydoc-gpt-small``, ``pydoc-gpt-large``) and MiniLM
(``minilm-l6-v2``) are each split into 2 and 3 stages by ``p2p-node shard``'s
own code, so the files are what ``p2p-node shard --model M --stages K`` writes:
the same bytes on every run (``tests/test_shard.py`` checks it). Needs only
p2p-node itself, not the ``build`` extra.

Run: ``python tools/bundled_stages.py [--out DIR]``, or ``python tools/build_models.py
stages``; a full ``build_models.py`` run ends with it. ``--check N`` then prints
the largest absolute difference between MiniLM's embeddings, whole and through
2 and 3 stages, over N sentences of Python's documentation (the README's figure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2p_node._shard import shard

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "p2p_node" / "bundled_models"
DEFAULT_OUT = ROOT / "p2p_node" / "bundled_stages"
STAGED_MODELS = ("pydoc-gpt-small", "pydoc-gpt-large", "minilm-l6-v2")
STAGE_COUNTS = (2, 3)


def build_stages(out: Path = DEFAULT_OUT, models: Path = MODELS) -> list[Path]:
    """Shard each of STAGED_MODELS into each of STAGE_COUNTS stages under `out`."""
    written = []
    for model_id in STAGED_MODELS:
        for k in STAGE_COUNTS:
            for directory in shard(models / model_id, k, out):
                size = (directory / "model.onnx").stat().st_size
                print(f"{directory.name:<24}{size / 1e6:>8.2f} MB")
                written.append(directory)
    return written


def check_minilm(stages: Path, n: int, models: Path = MODELS, batch: int = 32) -> dict[int, float]:
    """k -> the largest |whole - staged| over MiniLM's embeddings of `n` sentences."""
    import numpy as np
    import onnxruntime as ort
    from minilm_check import batch_tokenizer, feeds, pydoc_sentences

    from p2p_node._repository import read_model_card
    from p2p_node._shard import stage_id
    from p2p_node._stages import run_chain_locally

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    whole_dir = models / "minilm-l6-v2"
    whole = session(whole_dir / "model.onnx")
    tokenizer = batch_tokenizer(whole_dir / "tokenizer.json", 256)
    texts = pydoc_sentences()[:n]
    worst = {}
    for k in STAGE_COUNTS:
        cards = [read_model_card(stages / stage_id("minilm-l6-v2", i, k)) for i in range(k)]
        chain = [(session(c.onnx_path), c.stage) for c in cards]
        worst[k] = 0.0
        for i in range(0, len(texts), batch):
            fed = feeds(tokenizer, texts[i : i + batch])
            expected = whole.run(["sentence_embedding"], fed)[0]
            got = run_chain_locally(chain, fed)["sentence_embedding"]  # type: ignore[arg-type]
            worst[k] = max(worst[k], float(np.abs(expected - got).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", type=Path, default=MODELS, help="the whole models")
    parser.add_argument("--check", type=int, metavar="N", help="compare on N sentences")
    args = parser.parse_args(argv)
    build_stages(args.out, args.models)
    if args.check:
        for k, worst in check_minilm(args.out, args.check, args.models).items():
            print(
                f"minilm-l6-v2, {k} stages: max |whole - staged| {worst:.3g} "
                f"over {args.check} sentences"
            )


if __name__ == "__main__":
    main()
