"""Stages in records (an optional field: records without stages keep their bytes) and
chain placement over them (pure)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack
import pytest
from test_codec_bytes import RECORD, _descriptor

from gossip import ModelEntry, RecordError, StageOf, decode_record, encode_record
from gossip._model import SchemaError
from scheduler import NodeInfo, StageOffer, complete_chains, estimate_whole, plan_chain

STAGED = replace(
    RECORD,
    models=(
        *RECORD.models,
        ModelEntry(_descriptor("gpt@2of3"), loaded=False, stage=StageOf("gpt", 1, 3)),
    ),
)


def test_a_stage_entry_round_trips_and_plain_entries_keep_their_bytes() -> None:
    assert decode_record(encode_record(STAGED)) == STAGED
    raw = msgpack.unpackb(encode_record(STAGED))
    assert raw["models"][1]["stage"] == ["gpt", 1, 3]
    assert "stage" not in raw["models"][0]
    # Golden: this exact record's bytes (a record without stages keeps its bytes:
    # tests/wire_golden.json, checked by test_codec_bytes, still holds).
    digest = hashlib.sha256(encode_record(STAGED)).hexdigest()
    assert digest == "e8f78719468b66dfe353f7c76b0f54135cbc4dbffdf875694a8b2f84e0ae6635"


@pytest.mark.parametrize(
    "stage",
    [
        ["gpt", 3, 3],
        ["gpt", 1],
        ["", 0, 2],
        ["gpt", -1, 2],
        ["gpt", 0, 65],
        "gpt@1of2",
        ["g", 0, True],
    ],
)
def test_a_bad_stage_entry_is_refused(stage: object) -> None:
    raw = msgpack.unpackb(encode_record(STAGED))
    raw["models"][1]["stage"] = stage
    with pytest.raises(RecordError, match=r"stage|bool|integer"):
        decode_record(msgpack.packb(raw, use_bin_type=True))


def test_stage_of_checks_its_values() -> None:
    with pytest.raises(SchemaError):
        StageOf("gpt", 2, 2)


def _offers(parent: str, k: int, serving: dict[int, list[str]]) -> list[StageOffer]:
    return [
        StageOffer(parent, i, k, f"{parent}@{i + 1}of{k}", peer)
        for i, peers in serving.items()
        for peer in peers
    ]


def _node(peer: str, loaded: set[str], load: int = 0, ms: float = 1.0) -> NodeInfo:
    return NodeInfo(
        peer_id=peer,
        models_loaded=frozenset(loaded),
        in_flight=load,
        latency_ms=dict.fromkeys(loaded, ms),
    )


def test_complete_chains_need_every_stage() -> None:
    offers = _offers("gpt", 3, {0: ["a"], 1: ["b", "c"], 2: ["d"]}) + _offers("gpt", 2, {0: ["a"]})
    chains = complete_chains(offers)
    assert chains == {("gpt", 3): [{"a"}, {"b", "c"}, {"d"}]}


def test_plan_picks_the_cheaper_peer_per_stage_and_skips_failed_ones() -> None:
    offers = _offers("gpt", 3, {0: ["a"], 1: ["b", "c"], 2: ["d"]})
    ids = [o.model_id for o in offers]
    nodes = {
        "a": _node("a", set(ids)),
        "b": _node("b", set(ids), load=5),
        "c": _node("c", set(ids)),
        "d": _node("d", set(ids)),
    }
    rtt = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    plan = plan_chain("gpt", offers, nodes, rtt)
    assert plan is not None and plan.peers == ("a", "c", "d")
    assert "cheapest of 2 peers" in plan.hops[1].reason
    again = plan_chain("gpt", offers, nodes, rtt, exclude={"c"})
    assert again is not None and again.peers == ("a", "b", "d")
    assert plan_chain("gpt", offers, nodes, rtt, exclude={"d"}) is None
    assert plan_chain("other", offers, nodes, rtt) is None


def test_plan_keeps_consecutive_stages_on_one_peer_when_hops_cost_more() -> None:
    offers = _offers("gpt", 2, {0: ["a"], 1: ["a", "far"]})
    ids = {o.model_id for o in offers}
    nodes = {"a": _node("a", ids, ms=2.0), "far": _node("far", ids, ms=1.0)}
    plan = plan_chain("gpt", offers, nodes, {"a": 1.0, "far": 50.0})
    assert plan is not None and plan.peers == ("a", "a")
    assert "no hop" in plan.hops[1].reason
    near = plan_chain("gpt", offers, nodes, {"a": 1.0, "far": 0.1})
    assert near is not None and near.peers == ("a", "far")


def test_plan_prefers_the_faster_split() -> None:
    offers = _offers("gpt", 2, {0: ["a"], 1: ["b"]}) + _offers(
        "gpt", 3, {0: ["a"], 1: ["b"], 2: ["c"]}
    )
    ids = {o.model_id for o in offers}
    nodes = {p: _node(p, ids) for p in "abc"}
    plan = plan_chain("gpt", offers, nodes, dict.fromkeys("abc", 5.0))
    assert plan is not None and plan.k == 2


def test_whole_or_chain_goes_to_the_lower_estimate() -> None:
    offers = _offers("gpt", 2, {0: ["a"], 1: ["b"]})
    ids = {o.model_id for o in offers}
    nodes = {
        "a": _node("a", ids),
        "b": _node("b", ids),
        "w": _node("w", {"gpt"}, ms=4.0),
    }
    rtt = {"a": 0.5, "b": 0.5, "w": 0.5}
    plan = plan_chain("gpt", offers, nodes, rtt)
    whole = estimate_whole("gpt", nodes, rtt)
    assert plan is not None and whole is not None and whole[1] == "w"
    assert plan.estimate_ms < whole[0]  # two 1 ms stages and two hops beat 4 ms whole
    busy = {**nodes, "a": _node("a", ids, load=9)}
    busy_plan = plan_chain("gpt", offers, busy, rtt)
    assert busy_plan is not None and busy_plan.estimate_ms > whole[0]
    assert estimate_whole("nothing", nodes, rtt) is None
