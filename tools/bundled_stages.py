"""Write the bundled 2- and 3-stage splits into ``p2p_node/bundled_stages``.

The generators (``pydoc-gpt-small``, ``pydoc-gpt-large``) and MiniLM
(``minilm-l6-v2``) are each split into 2 and 3 stages by ``p2p-node shard``'s
own code, so the files are what ``p2p-node shard --model M --stages K`` writes:
the same bytes on every run (``tests/test_shard.py`` checks it). Needs only
p2p-node itself, not the ``build`` extra.

Run: ``python tools/bundled_stages.py [--out DIR]``, or ``python tools/build_models.py
stages``; a full ``build_models.py`` run ends with it.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", type=Path, default=MODELS, help="the whole models")
    args = parser.parse_args(argv)
    build_stages(args.out, args.models)


if __name__ == "__main__":
    main()
