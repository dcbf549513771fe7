"""What a node knows about its peers, read as immutable snapshots.

For now an entry is a peer's address and the models it answered a `models`
query with; gossip records (capabilities, load) extend it later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import trio

from ._model import ModelDescriptor


@dataclass(frozen=True, slots=True)
class PeerEntry:
    peer_id: str
    addrs: tuple[str, ...]
    models: tuple[ModelDescriptor, ...]

    def serves(self, model_id: str) -> bool:
        return any(m.id == model_id for m in self.models)


@dataclass(frozen=True, slots=True)
class ViewSnapshot:
    """A frozen copy of the view: safe to hold across awaits."""

    peers: Mapping[str, PeerEntry]

    def serving(self, model_id: str) -> tuple[PeerEntry, ...]:
        """Peers that serve `model_id`, in peer id order (stable for callers)."""
        return tuple(self.peers[p] for p in sorted(self.peers) if self.peers[p].serves(model_id))

    def model_ids(self) -> frozenset[str]:
        return frozenset(m.id for e in self.peers.values() for m in e.models)


class PeerView:
    """The mutable view, owned by one node. Readers take `snapshot()`."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerEntry] = {}
        self._snapshot = ViewSnapshot(MappingProxyType({}))
        self._changed = trio.Event()

    def update(self, entry: PeerEntry) -> None:
        self._peers[entry.peer_id] = entry
        self._refresh()

    def remove(self, peer_id: str) -> None:
        if self._peers.pop(peer_id, None) is not None:
            self._refresh()

    def snapshot(self) -> ViewSnapshot:
        return self._snapshot

    async def wait_until(self, predicate: Callable[[ViewSnapshot], bool]) -> ViewSnapshot:
        """Wait for the first snapshot (maybe the current one) that satisfies `predicate`."""
        while not predicate(self._snapshot):
            await self._changed.wait()
        return self._snapshot

    def _refresh(self) -> None:
        self._snapshot = ViewSnapshot(MappingProxyType(dict(self._peers)))
        self._changed.set()
        self._changed = trio.Event()
