"""Every model the network serves, as one node sees it."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gossip import ModelDescriptor, PeerRecord
from scheduler import ErrorCode, JobError


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model, who serves it, and how fast it ran there (median of the serving
    peers' announced EWMA latency; None before any peer has run it)."""

    descriptor: ModelDescriptor
    peers: tuple[str, ...]
    latency_ms: float | None = None

    @property
    def model_id(self) -> str:
        return self.descriptor.id


class ModelCatalog:
    """Models by id and by task type. Built once per view; lookups are dict reads."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        self._by_id = {e.model_id: e for e in sorted(entries, key=lambda e: e.model_id)}
        by_task: dict[str, list[CatalogEntry]] = {}
        for entry in self._by_id.values():
            by_task.setdefault(entry.descriptor.task_type, []).append(entry)
        self._by_task = {task: tuple(es) for task, es in by_task.items()}

    @classmethod
    def from_records(
        cls,
        records: Iterable[PeerRecord],
        *,
        local_peer_id: str | None = None,
        local_models: Sequence[ModelDescriptor] = (),
        local_latency_ms: Mapping[str, float] | None = None,
    ) -> ModelCatalog:
        """The catalog of a view. When peers announce different descriptors under one
        model id (a version skew mid-upgrade), the one most peers announce wins and
        only the peers announcing it count as serving it."""
        announced: dict[str, list[tuple[str, ModelDescriptor, float | None]]] = {}
        for record in records:
            latency = {p.model_id: p.latency_ms for p in record.performance if p.samples}
            for entry in record.models:
                model = entry.descriptor
                announced.setdefault(model.id, []).append(
                    (record.peer_id, model, latency.get(model.id))
                )
        local_latency = local_latency_ms or {}
        for model in local_models:
            announced.setdefault(model.id, []).append(
                (local_peer_id or "local", model, local_latency.get(model.id))
            )
        entries = []
        for sightings in announced.values():
            votes = Counter(model for _, model, _ in sightings)
            winner = max(votes, key=lambda m: (votes[m], m.version, m.sha256))
            agreeing = [(peer, latency) for peer, model, latency in sightings if model == winner]
            latencies = [latency for _, latency in agreeing if latency is not None]
            entries.append(
                CatalogEntry(
                    winner,
                    tuple(sorted(peer for peer, _ in agreeing)),
                    statistics.median(latencies) if latencies else None,
                )
            )
        return cls(entries)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    def entries(self) -> tuple[CatalogEntry, ...]:
        return tuple(self._by_id.values())

    def task_types(self) -> frozenset[str]:
        return frozenset(self._by_task)

    def get(self, model_id: str) -> CatalogEntry:
        try:
            return self._by_id[model_id]
        except KeyError:
            raise JobError(
                ErrorCode.UNKNOWN_MODEL,
                f"no peer serves model {model_id!r}; the network serves {sorted(self._by_id)}",
            ) from None

    def for_task(self, task_type: str) -> tuple[CatalogEntry, ...]:
        """Models of `task_type`; UNKNOWN_TASK naming the task types there are."""
        entries = self._by_task.get(task_type)
        if not entries:
            raise JobError(
                ErrorCode.UNKNOWN_TASK,
                f"no peer serves a model for task type {task_type!r}; "
                f"the network serves {sorted(self._by_task) or 'nothing'}",
            )
        return entries
