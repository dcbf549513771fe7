"""Which of a node's models are in memory: a budget, least recently used unloaded first.

Every served model was loaded once at start, so its descriptor (input and
output specs) is known whether or not its onnxruntime session is still in
memory. A request for a model not in memory loads it in a worker thread, after
unloading the least recently used models that no request is using, until it
fits. Loads are serialized: two requests for one model never load it twice,
and the budget is checked against what is loaded, not what is being loaded.

A model's memory is an estimate (`ModelCard.memory_bytes`): its files on disk,
or `memory_mb` in its model.toml. The resident set size measured around a load
is no better: the allocator keeps freed memory, so on the bundled models the
RSS delta reads 0 for some and 6x the file for a tree ensemble.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import onnxruntime as ort
import trio

from gossip import ModelDescriptor
from scheduler import ErrorCode, JobError

from ._config import ConfigError, ExecutorConfig
from ._repository import ModelCard, RepositoryError

logger = logging.getLogger(__name__)

MB = 1 << 20


@dataclass(frozen=True, slots=True)
class LoadedModel:
    descriptor: ModelDescriptor
    session: ort.InferenceSession
    card: ModelCard
    mixes_rows: bool = False  # a row's result depends on the others in its run
    # A text generator's second session, for decode steps of many rows and prefills
    # of many tokens: with the threads of every worker slot (`_executor._wide_session`),
    # loaded and unloaded with the first, and counted in the memory budget as a copy.
    wide: ort.InferenceSession | None = None

    @property
    def memory_bytes(self) -> int:
        return self.card.memory_bytes * (1 if self.wide is None else 2)


LoadFn = Callable[[ModelCard, ExecutorConfig], LoadedModel]


class _Slot:
    """One served model: its descriptor always, its session while loaded."""

    __slots__ = (
        "card",
        "descriptor",
        "held",
        "last_used",
        "memory_bytes",
        "mixes_rows",
        "running",
        "session",
        "wide",
    )

    def __init__(self, model: LoadedModel) -> None:
        self.card = model.card
        self.descriptor = model.descriptor
        self.mixes_rows = model.mixes_rows
        self.memory_bytes = model.memory_bytes
        self.session: ort.InferenceSession | None = model.session
        self.wide = model.wide
        self.running = 0  # requests using the session now: never unloaded under them
        self.last_used = 0
        self.held: LoadedModel | None = None  # what `hold` gave last, for its session

    def unload(self) -> None:
        """Drop its sessions (and the last `hold`'s model, which holds them too)."""
        self.session = self.wide = self.held = None


class ResidentModels:
    """The models a node serves, and which are loaded, within `model_memory_mb`."""

    def __init__(self, config: ExecutorConfig, load: LoadFn, limiter: trio.CapacityLimiter) -> None:
        self._config = config
        self._load = load
        self._limiter = limiter
        budget = config.model_memory_mb
        self.budget_bytes = None if budget is None else round(budget * MB)
        self._slots: dict[str, _Slot] = {}
        self._loading = trio.Lock()
        self._tick = itertools.count(1)
        self.loads = 0  # on demand, after start
        self.unloads = 0
        self.loads_by_model: Counter[str] = Counter()  # the same, per served model
        self.unloads_by_model: Counter[str] = Counter()
        self.on_change: Callable[[], None] = lambda: None  # the loaded set changed
        # Memory the budget holds besides the loaded models: generations' KV caches.
        self.held_bytes: Callable[[], int] = lambda: 0

    # --- what is served and what is loaded ------------------------------------------

    @property
    def descriptors(self) -> tuple[ModelDescriptor, ...]:
        return tuple(s.descriptor for s in self._slots.values())

    def get(self, model_id: str) -> ModelDescriptor | None:
        slot = self._slots.get(model_id)
        return None if slot is None else slot.descriptor

    def card(self, model_id: str) -> ModelCard | None:
        slot = self._slots.get(model_id)
        return None if slot is None else slot.card

    def mixes_rows(self, model_id: str) -> bool:
        """Whether a row's result depends on the other rows of its run (KeyError if
        `model_id` is not served); known from its first load."""
        return self._slots[model_id].mixes_rows

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._slots

    def ids(self) -> list[str]:
        return sorted(self._slots)

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(i for i, s in self._slots.items() if s.session is not None)

    def is_loaded(self, model_id: str) -> bool:
        slot = self._slots.get(model_id)
        return slot is not None and slot.session is not None

    @property
    def used_bytes(self) -> int:
        return sum(s.memory_bytes for s in self._slots.values() if s.session is not None)

    def lru_order(self) -> list[str]:
        """Loaded models, least recently used first: the order they are unloaded in."""
        loaded = [s for s in self._slots.values() if s.session is not None]
        return [s.descriptor.id for s in sorted(loaded, key=lambda s: s.last_used)]

    # --- at start -----------------------------------------------------------------------

    def check_fits(self, card: ModelCard) -> None:
        """ConfigError if `card` alone is bigger than the whole budget (it could never load)."""
        if self.budget_bytes is not None and card.memory_bytes > self.budget_bytes:
            raise ConfigError(
                f"model {card.id} needs about {card.memory_bytes / MB:.3g} MB "
                f"({_estimate_source(card)}), more than the whole model memory budget of "
                f"{self._config.model_memory_mb:g} MB (model_memory_mb, --model-memory-mb): "
                "raise the budget or do not serve it"
            )

    def add(self, model: LoadedModel) -> None:
        """Serve `model`: kept loaded if it fits in what is left of the budget, else
        its session is dropped and it loads on first use."""
        self.check_fits(model.card)
        slot = _Slot(model)
        budget = self.budget_bytes
        if budget is not None and self.used_bytes + self.held_bytes() + slot.memory_bytes > budget:
            slot.unload()
            logger.info("model %s stays on disk: the memory budget is full", model.card.id)
        self._slots[model.descriptor.id] = slot

    # --- on demand ----------------------------------------------------------------------

    def hold(self, model_id: str) -> LoadedModel | None:
        """`use` without awaiting, for a model in memory: held (never unloaded) until
        `release(model_id)`; None, holding nothing, if it is not loaded now (then
        `use` loads it). A small job's run is a few microseconds of Python; the
        async context manager around it cost about as much again."""
        slot = self._slots[model_id]
        session = slot.session
        if session is None:
            return None
        slot.running += 1
        slot.last_used = next(self._tick)
        held = slot.held
        if held is None or held.session is not session:
            held = slot.held = LoadedModel(
                slot.descriptor, session, slot.card, slot.mixes_rows, slot.wide
            )
        return held

    def release(self, model_id: str) -> None:
        self._slots[model_id].running -= 1

    @asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[LoadedModel]:
        """The loaded model for one run (loading it first if needed); it is not
        unloaded while the run holds it."""
        slot = self._slots[model_id]
        if slot.session is None:
            await self._load_on_demand(slot)
        model = self.hold(model_id)
        assert model is not None  # loaded above, and never unloaded while running > 0
        try:
            yield model
        finally:
            self.release(model_id)

    async def _load_on_demand(self, slot: _Slot) -> None:
        async with self._loading:
            if slot.session is not None:  # loaded by the request we waited for
                return
            self._make_room(slot)
            try:
                model = await trio.to_thread.run_sync(
                    self._load, slot.card, self._config, limiter=self._limiter
                )
            except RepositoryError as error:
                raise JobError(
                    ErrorCode.INTERNAL, f"model {slot.descriptor.id} failed to load: {error}"
                ) from None
            slot.session, slot.wide = model.session, model.wide
            self.loads += 1
            self.loads_by_model[slot.descriptor.id] += 1
            logger.info(
                "loaded model %s on demand (%.3g of %s MB in use)",
                slot.descriptor.id,
                self.used_bytes / MB,
                "no limit" if self.budget_bytes is None else f"{self.budget_bytes / MB:g}",
            )
        self.on_change()

    def _make_room(self, slot: _Slot) -> None:
        """Unload idle models, least recently used first, until `slot` fits; OVERLOADED
        (and nothing unloaded) if the models in use leave too little."""
        self.make_room(slot.memory_bytes, f"model {slot.descriptor.id}")

    def make_room(self, needed: int, what: str, keep: str | None = None) -> None:
        """Unload idle models (but `keep`), least recently used first, until `needed`
        more bytes fit in the budget beside the loaded models and `held_bytes`;
        OVERLOADED (and nothing unloaded) if the models in use and the held bytes
        leave too little."""
        budget = self.budget_bytes
        if budget is None:
            return
        idle = sorted(
            (
                s
                for i, s in self._slots.items()
                if s.session is not None and s.running == 0 and i != keep
            ),
            key=lambda s: s.last_used,
        )
        held = self.held_bytes()
        free = budget - self.used_bytes - held
        victims = list(_until_enough(idle, needed - free))
        if free + sum(v.memory_bytes for v in victims) < needed:
            busy = sorted(i for i, s in self._slots.items() if s.session is not None and s.running)
            holders = [f"models in use ({', '.join(busy)})"] if busy else []
            if held:
                holders.append(f"generations' KV caches ({held / MB:.3g} MB)")
            raise JobError(
                ErrorCode.OVERLOADED,
                f"{what} needs about {needed / MB:.3g} MB and the model memory budget of "
                f"{budget / MB:g} MB (model_memory_mb) is held by "
                f"{' and '.join(holders) or 'nothing'}; try again shortly",
            )
        for victim in victims:
            victim.unload()
            self.unloads += 1
            self.unloads_by_model[victim.descriptor.id] += 1
            logger.info("unloaded model %s (least recently used)", victim.descriptor.id)
        if victims:
            self.on_change()


def _until_enough(slots: Iterable[_Slot], needed: int) -> Iterable[_Slot]:
    """The first `slots` whose memory adds up to at least `needed` bytes."""
    for slot in slots:
        if needed <= 0:
            return
        yield slot
        needed -= slot.memory_bytes


def _estimate_source(card: ModelCard) -> str:
    if card.memory_mb is not None:
        return "memory_mb in its model.toml"
    return "the size of its files"
