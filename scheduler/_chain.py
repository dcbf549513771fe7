"""Placing a chain: one peer per stage of a model split into stages.

Pure: no trio, no libp2p. The view says which peers serve which stage (a
`StageOffer` each); `plan_chain` picks, for each split of the model that the
view can run whole (every stage served by a live peer), the peers minimising
the estimated end-to-end time, and returns the cheapest chain. As Petals routes,
it is a shortest path: stage by stage, the cost of running stage i on peer p is
its compute (the peer's observed latency for that stage, scaled by its load,
plus a load from disk if it is not in memory) and the hop to p from the peer of
stage i-1 (the coordinator's observed latency to p; nothing when it is the same
peer, which runs consecutive stages without a hop). The answer comes back along
the same hops, so each hop counts twice.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from ._node_info import NodeInfo

DEFAULT_STAGE_MS = 1.0  # a stage nobody has timed yet
DEFAULT_RTT_MS = 1.0  # a peer the coordinator has not timed yet
LOAD_FROM_DISK_MS = 50.0


@dataclass(frozen=True, slots=True)
class StageOffer:
    """Peer `peer_id` serves `model_id`, stage `index` (0-based) of `k` of `parent`."""

    parent: str
    index: int
    k: int
    model_id: str
    peer_id: str


@dataclass(frozen=True, slots=True)
class ChainHop:
    index: int
    peer_id: str
    model_id: str
    compute_ms: float
    hop_ms: float
    reason: str


@dataclass(frozen=True, slots=True)
class ChainPlan:
    parent: str
    k: int
    hops: tuple[ChainHop, ...]
    estimate_ms: float

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(h.peer_id for h in self.hops)


def complete_chains(offers: Iterable[StageOffer]) -> dict[tuple[str, int], list[set[str]]]:
    """(parent, k) -> the peers serving each stage, for the splits whose every stage
    some peer serves."""
    by_split: dict[tuple[str, int], list[set[str]]] = {}
    for offer in offers:
        peers = by_split.setdefault((offer.parent, offer.k), [set() for _ in range(offer.k)])
        if offer.index < len(peers):
            peers[offer.index].add(offer.peer_id)
    return {split: peers for split, peers in by_split.items() if all(peers)}


def stage_compute_ms(node: NodeInfo | None, model_id: str) -> tuple[float, str]:
    """The estimated time of one run of `model_id` on `node`, and why."""
    if node is None:
        return DEFAULT_STAGE_MS + LOAD_FROM_DISK_MS, "not in the view: assumed on disk"
    base = node.latency_ms.get(model_id, DEFAULT_STAGE_MS)
    observed = "observed" if model_id in node.latency_ms else "untimed"
    ms = base * (1 + node.load)
    why = f"{observed} {base:.3g} ms x (1 + load {node.load})"
    if model_id not in node.models_loaded:
        ms += LOAD_FROM_DISK_MS
        why += f" + {LOAD_FROM_DISK_MS:g} ms load from disk"
    return ms, why


def plan_chain(
    parent: str,
    offers: Iterable[StageOffer],
    nodes: Mapping[str, NodeInfo],
    rtt_ms: Mapping[str, float],
    *,
    exclude: Collection[str] = (),
    local_peer_id: str = "",
) -> ChainPlan | None:
    """The cheapest complete chain for `parent` avoiding the peers in `exclude`, or
    None when no split of it is complete. `rtt_ms`: the coordinator's observed
    latency to each peer (itself: 0)."""
    offers = [o for o in offers if o.parent == parent and o.peer_id not in exclude]
    best: ChainPlan | None = None
    for (_, k), peers in sorted(complete_chains(offers).items()):
        model_of = {(o.index, o.peer_id): o.model_id for o in offers if o.k == k}
        plan = _shortest(parent, k, peers, model_of, nodes, rtt_ms, local_peer_id)
        if best is None or plan.estimate_ms < best.estimate_ms:
            best = plan
    return best


def _rtt(rtt_ms: Mapping[str, float], peer: str, local: str) -> float:
    return 0.0 if peer == local else rtt_ms.get(peer, DEFAULT_RTT_MS)


def _shortest(
    parent: str,
    k: int,
    peers: list[set[str]],
    model_of: Mapping[tuple[int, str], str],
    nodes: Mapping[str, NodeInfo],
    rtt_ms: Mapping[str, float],
    local: str,
) -> ChainPlan:
    # cost[p]: the cheapest way to have run stages 0..i with stage i on p.
    cost: dict[str, float] = {}
    back: list[dict[str, str | None]] = []
    compute: list[dict[str, tuple[float, str]]] = []
    for i in range(k):
        step: dict[str, float] = {}
        came: dict[str, str | None] = {}
        here = {p: stage_compute_ms(nodes.get(p), model_of[(i, p)]) for p in sorted(peers[i])}
        for p, (ms, _) in here.items():
            if i == 0:
                step[p], came[p] = 2 * _rtt(rtt_ms, p, local) + ms, None
                continue
            options = [
                (c + (0.0 if q == p else 2 * _rtt(rtt_ms, p, local)) + ms, q)
                for q, c in cost.items()
            ]
            step[p], came[p] = min(options)
        cost = step
        back.append(came)
        compute.append(here)
    end = min(cost, key=lambda p: (cost[p], p))
    total = cost[end]
    chosen = [end]
    for i in range(k - 1, 0, -1):
        previous = back[i][chosen[-1]]
        assert previous is not None
        chosen.append(previous)
    chosen.reverse()
    hops = []
    for i, p in enumerate(chosen):
        ms, why = compute[i][p]
        same = i > 0 and chosen[i - 1] == p
        hop = 0.0 if same else 2 * _rtt(rtt_ms, p, local)
        others = len(peers[i]) - 1
        reason = (
            f"{why}; "
            + ("same peer as the stage before: no hop" if same else f"hop {hop:.3g} ms")
            + (f"; cheapest of {others + 1} peers" if others else "; the only peer")
        )
        hops.append(ChainHop(i, p, model_of[(i, p)], ms, hop, reason))
    return ChainPlan(parent, k, tuple(hops), total if math.isfinite(total) else math.inf)


def estimate_whole(
    model_id: str, nodes: Mapping[str, NodeInfo], rtt_ms: Mapping[str, float], local: str = ""
) -> tuple[float, str] | None:
    """The estimated time of `model_id` run whole on the best peer serving it, and
    that peer; None when no peer serves it whole. Same terms as a chain's."""
    best: tuple[float, str] | None = None
    for peer, node in sorted(nodes.items()):
        if not node.serves(model_id):
            continue
        ms = stage_compute_ms(node, model_id)[0] + 2 * _rtt(rtt_ms, peer, local)
        if best is None or ms < best[0]:
            best = (ms, peer)
    return best


def offers_from_ids(peer_id: str, model_ids: Iterable[str]) -> list[StageOffer]:
    """Stage offers read from model ids of the form ``parent@IofK`` (1-based I)."""
    offers = []
    for model_id in model_ids:
        parent, sep, rest = model_id.rpartition("@")
        index, of, k = rest.partition("of")
        if sep and of and index.isdigit() and k.isdigit() and 0 < int(index) <= int(k):
            offers.append(StageOffer(parent, int(index) - 1, int(k), model_id, peer_id))
    return offers
