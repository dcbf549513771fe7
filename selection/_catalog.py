"""Every model the network serves, as one node sees it.

A stage (a record's model entry with a `stage`) is no model to select: it takes
activations, not the task's inputs. A model served only as stages is in the
catalog once some split of it is complete (every stage announced by a live
peer), as one entry for the parent, so that a job naming only a task can
select it; where to run it, whole or through a chain, is the node's choice.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from gossip import ModelDescriptor, PeerRecord, StageOf
from scheduler import ErrorCode, JobError, StageOffer, complete_chains


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model, who serves it, and how fast it ran there (median of the serving
    peers' announced EWMA latency; None before any peer has run it)."""

    descriptor: ModelDescriptor
    peers: tuple[str, ...]
    latency_ms: float | None = None
    stages: int = 0  # served only as a chain of this many stages (the fewest complete)

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
        local_stages: Mapping[str, StageOf] | None = None,
    ) -> ModelCatalog:
        """The catalog of a view. When peers announce different descriptors under one
        model id (a version skew mid-upgrade), the one most peers announce wins and
        only the peers announcing it count as serving it. `local_stages`: which of
        `local_models` are stages (model id -> what of)."""
        announced: dict[str, list[_Sighting]] = {}
        stages: dict[str, list[tuple[StageOf, _Sighting]]] = {}
        for record in records:
            latency = {p.model_id: p.latency_ms for p in record.performance if p.samples}
            for entry in record.models:
                model = entry.descriptor
                seen = (record.peer_id, model, latency.get(model.id))
                if entry.stage is None:
                    announced.setdefault(model.id, []).append(seen)
                else:
                    stages.setdefault(entry.stage.parent, []).append((entry.stage, seen))
        local_latency = local_latency_ms or {}
        local_stage = local_stages or {}
        for model in local_models:
            seen = (local_peer_id or "local", model, local_latency.get(model.id))
            of = local_stage.get(model.id)
            if of is None:
                announced.setdefault(model.id, []).append(seen)
            else:
                stages.setdefault(of.parent, []).append((of, seen))
        entries = [_entry(sightings) for sightings in announced.values()]
        for parent, sightings in stages.items():
            if parent not in announced:
                entries.extend(_chain_entry(parent, sightings))
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


_Sighting = tuple[str, ModelDescriptor, float | None]  # (peer, descriptor, latency ms)


def _entry(sightings: Sequence[_Sighting]) -> CatalogEntry:
    votes = Counter(model for _, model, _ in sightings)
    winner = max(votes, key=lambda m: (votes[m], m.version, m.sha256))
    agreeing = [(peer, latency) for peer, model, latency in sightings if model == winner]
    latencies = [latency for _, latency in agreeing if latency is not None]
    return CatalogEntry(
        winner,
        tuple(sorted(peer for peer, _ in agreeing)),
        statistics.median(latencies) if latencies else None,
    )


def _chain_entry(parent: str, sightings: Sequence[tuple[StageOf, _Sighting]]) -> list[CatalogEntry]:
    """`parent` as one model, from its stages, when some split of it is complete: the
    split with the fewest stages. Its descriptor is the first stage's (`shard` copies
    the parent's task, accuracy and cost into each) with the parent's id and the
    last stage's outputs; its latency the sum of the stages' medians, once all ran."""
    offers = [StageOffer(of.parent, of.index, of.k, d.id, peer) for of, (peer, d, _) in sightings]
    complete = sorted(k for p, k in complete_chains(offers) if p == parent)
    if not complete:
        return []
    k = complete[0]
    by_index: dict[int, list[_Sighting]] = {}
    for of, seen in sightings:
        if of.k == k:
            by_index.setdefault(of.index, []).append(seen)
    ends = [_entry(by_index[i]) for i in range(k)]
    first, last = ends[0].descriptor, ends[-1].descriptor
    descriptor = replace(
        first,
        id=parent,
        outputs=last.outputs,
        description=f"Served as {k} stages. " + first.description.split(". ", 1)[-1],
    )
    latencies = [e.latency_ms for e in ends]
    peers = sorted({peer for e in ends for peer in e.peers})
    total = None if None in latencies else sum(x for x in latencies if x is not None)
    return [CatalogEntry(descriptor, tuple(peers), total, stages=k)]
