"""The text side of a chain's coordinator: the tokenizer and `[text]` settings of a
model served only as stages, so that any node can coordinate its text jobs and
generations, not only one that serves a stage of it.

`p2p-node shard` puts the parent's `[text]` table (as `[stage.text]` in the
stage's model.toml) and its tokenizer beside every stage. A coordinator that
serves a stage reads them from its own disk. One that serves none fetches the
two files of a stage from a peer announcing it, over the fetch protocol
(`_download.Download.read_files`): every chunk is checked against that peer's
manifest, whose model.onnx must hash to the sha256 the peer's record announces,
and each file against its whole hash. They are kept in memory, by parent model,
for the node's life; nothing is written to disk.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from scheduler import ErrorCode, JobError, StageOffer

from ._download import (
    Download,
    FetchError,
    FetchFailure,
    FetchProgress,
    announcers,
    most_announced,
)
from ._manifest import CARD_FILE, FetchWireError, check_file_name
from ._repository import Postprocess, RepositoryError, TextSpec, parse_text_spec

if TYPE_CHECKING:
    from ._node import Node

logger = logging.getLogger(__name__)

MAX_TEXT_FILE_BYTES = 64 << 20  # a stage's model.toml or tokenizer fetched into memory


@dataclass(frozen=True, slots=True)
class StageText:
    """A staged model's `[text]` table and tokenizer, and where they came from."""

    parent: str
    table: dict[str, Any]
    tokenizer_json: str
    source: Path  # the model.toml they came with (a peer's: "<peer>/<stage id>/model.toml")

    def spec(self) -> TextSpec:
        """The table as a text model's spec; JobError when it is not one."""
        try:
            return parse_text_spec(self.source, self.table)
        except RepositoryError as error:
            raise JobError(ErrorCode.INTERNAL, f"model {self.parent}: {error}") from None

    def tokenizer(self) -> Tokenizer:
        """A new tokenizer (each user sets its own truncation and padding)."""
        return Tokenizer.from_str(self.tokenizer_json)

    def generation(self) -> tuple[Tokenizer, int, int]:
        """The tokenizer, eos token id and context window of a generator; JobError
        when the model is no generator."""
        spec = self.spec()
        if spec.postprocess is not Postprocess.GENERATE:
            raise JobError(
                ErrorCode.INVALID_INPUT,
                f"model {self.parent} does not generate text ({spec.postprocess.value})",
            )
        decoder = self.table.get("decoder", {})
        eos = decoder.get("eos_token_id", -1) if isinstance(decoder, dict) else None
        if type(eos) is not int:
            raise JobError(ErrorCode.INTERNAL, f"{self.source}: eos_token_id must be an integer")
        return self.tokenizer(), eos, spec.max_tokens


def local_stage_text(node: Node, parent: str) -> StageText | None:
    """From a stage of `parent` this node serves, with its tokenizer beside it."""
    for descriptor in node.models:
        card = node.executor.models.card(descriptor.id)
        if card is None or card.stage is None or card.stage.parent != parent:
            continue
        path = card.onnx_path.parent / "model.toml"
        with path.open("rb") as f:
            table = tomllib.load(f).get("stage", {}).get("text")
        if not isinstance(table, dict):
            continue
        tokenizer = path.parent / str(table.get("tokenizer", "tokenizer.json"))
        if tokenizer.is_file():
            return StageText(parent, table, tokenizer.read_text(encoding="utf-8"), path)
    return None


async def fetch_stage_text(
    node: Node, parent: str, offers: Sequence[StageOffer], on_corrupt: Callable[[], None]
) -> StageText:
    """From a peer announcing a stage of `parent` (first stages first). FetchError
    naming each stage model tried and why it failed."""
    stage_ids = sorted({(o.index, o.model_id) for o in offers if o.parent == parent})
    why: list[str] = []
    for _, model_id in stage_ids:
        found = announcers(node.view.snapshot(), model_id, None)
        found.pop(node.peer_id, None)
        if not found:
            continue
        descriptor = most_announced(found)
        download = Download(node, descriptor, FetchProgress(model_id), on_corrupt)
        try:
            card = await download.read_files((CARD_FILE,), MAX_TEXT_FILE_BYTES)
            table = _text_table(card[CARD_FILE])
            name = check_file_name(table.get("tokenizer", "tokenizer.json"))
            data = (await download.read_files((name,), MAX_TEXT_FILE_BYTES))[name]
        except FetchError as error:
            why.append(f"{model_id}: {error.message}")
            continue
        except FetchWireError as error:
            why.append(f"{model_id}: {error}")
            continue
        try:
            text = StageText(parent, table, data.decode("utf-8"), Path(model_id) / CARD_FILE)
            text.tokenizer()
        except Exception as error:  # UTF-8, or tokenizers' own untyped Exception
            why.append(f"{model_id}: its tokenizer does not load: {error}")
            continue
        logger.info("read the tokenizer of %s from a peer serving %s", parent, model_id)
        return text
    raise FetchError(
        FetchFailure.NO_PEER,
        f"no peer announcing a stage of {parent} gave its tokenizer"
        + (f": {'; '.join(why[:3])}" if why else ""),
    )


def _text_table(model_toml: bytes) -> dict[str, Any]:
    try:
        table = tomllib.loads(model_toml.decode("utf-8")).get("stage", {}).get("text")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise FetchWireError(f"model.toml does not parse: {error}") from None
    if not isinstance(table, dict):
        raise FetchWireError("model.toml has no [stage.text] table: not a text model")
    return table
