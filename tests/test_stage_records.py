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


def _stage_record(peer: str, *stages: tuple[str, int, int], whole: tuple[str, ...] = ()) -> object:
    from gossip import TensorSpec

    entries = [ModelEntry(_descriptor(m), loaded=True) for m in whole]
    for parent, index, k in stages:
        descriptor = replace(
            _descriptor(f"{parent}@{index + 1}of{k}"),
            description=f"Stage {index + 1} of {k} of {parent} (layers {index}-{index}). A GPT.",
            outputs=(TensorSpec(f"h{index}", "float32", (None, 8)),),
        )
        entries.append(ModelEntry(descriptor, loaded=True, stage=StageOf(parent, index, k)))
    return replace(RECORD, peer_id=peer, models=tuple(entries), performance=())


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        pytest.param([[("gpt", 0, 2)]], {}, id="incomplete-split-is-no-model"),
        pytest.param(
            [[("gpt", 0, 2)], [("gpt", 1, 2)]], {"gpt": (2, ("a", "b"))}, id="complete-split"
        ),
        pytest.param(
            [[("gpt", 0, 3), ("gpt", 0, 2)], [("gpt", 1, 2), ("gpt", 1, 3)], [("gpt", 2, 3)]],
            {"gpt": (2, ("a", "b"))},
            id="fewest-stages-split",
        ),
        pytest.param(
            [[("gpt", 0, 2)], [("gpt", 1, 2)], [("other", 0, 2)]],
            {"gpt": (2, ("a", "b"))},
            id="other-parent-incomplete",
        ),
    ],
)
def test_the_catalog_lists_a_model_served_only_as_a_complete_chain(
    records: list[list[tuple[str, int, int]]], expected: dict[str, tuple[int, tuple[str, ...]]]
) -> None:
    from selection import ModelCatalog

    catalog = ModelCatalog.from_records(
        _stage_record(peer, *stages)  # type: ignore[misc]
        for peer, stages in zip("abc", records, strict=False)
    )
    got = {e.model_id: (e.stages, e.peers) for e in catalog.entries()}
    assert got == expected
    for model_id, (k, _) in expected.items():
        entry = catalog.get(model_id)
        assert entry.descriptor.outputs[0].name == f"h{k - 1}"  # the last stage's
        assert entry.descriptor.description == f"Served as {k} stages. A GPT."
        assert [e.model_id for e in catalog.for_task("image-classification")] == [model_id]


def test_a_model_served_whole_keeps_its_entry_and_local_stages_count() -> None:
    from selection import ModelCatalog

    whole = ModelCatalog.from_records(
        [_stage_record("a", ("gpt", 0, 2), whole=("gpt",)), _stage_record("b", ("gpt", 1, 2))]  # type: ignore[list-item]
    )
    assert [(e.model_id, e.stages, e.peers) for e in whole.entries()] == [("gpt", 0, ("a",))]
    local = ModelCatalog.from_records(
        [_stage_record("b", ("gpt", 1, 2))],  # type: ignore[list-item]
        local_peer_id="me",
        local_models=[_descriptor("gpt@1of2")],
        local_stages={"gpt@1of2": StageOf("gpt", 0, 2)},
    )
    assert [(e.model_id, e.stages, e.peers) for e in local.entries()] == [("gpt", 2, ("b", "me"))]
