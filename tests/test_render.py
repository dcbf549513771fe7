"""What the command line prints, from values: tables for people, one JSON line for programs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_record import BARE, REALISTIC

from p2p_node import _render
from p2p_node._batch import BatchResult
from p2p_node._messages import Learned, PeerReport
from scheduler import Candidate, Excluded, InferenceResult, Placement
from selection import AdvancedModelSelectionStrategy, LeftOut, RankedModel, Selection

RESULT = InferenceResult(
    "job-1",
    "digits-mlp",
    {"label": np.array([3, 7]), "probabilities": np.array([[0.25, 0.75]], dtype=np.float32)},
    "12D3KooWexecutor",
    1.23456,
    4.5,
    route=(("digits-logreg", 3), ("digits-mlp", 1)),
)
PLACEMENT = Placement(
    "digits-mlp",
    (Candidate("peer-a", 0.5, "2 outstanding"), Candidate("peer-bb", 1.25, "idle")),
    (Excluded("peer-c", "no GPU"),),
)
SELECTION = Selection(
    AdvancedModelSelectionStrategy.HYBRID,
    "image-classification",
    "len<=64",
    (RankedModel("digits-logreg", 0.9, ("cheapest", "accurate")),),
    (LeftOut("digits-forest", "input_length <= 32"),),
)
LEARNED = Learned("digits-logreg", "len<=64", 12, 1, 0.8, 0.92, 1.0, 3.0)


def test_a_table_pads_each_column_to_its_widest_cell_and_strips_line_ends() -> None:
    table = _render.format_table([("a", "bb", "c"), ("ccc", "d", "")])
    assert table.splitlines() == ["a    bb  c", "ccc  d"]


def test_a_result_as_json_holds_every_output_and_the_route() -> None:
    text = _render.result_json(RESULT, total_ms=12.34567)
    assert "\n" not in text
    shown = json.loads(text)
    assert shown["job_id"] == RESULT.job_id and shown["executor"] == RESULT.executor
    assert shown["queue_ms"] == round(RESULT.queue_ms, 3) and shown["total_ms"] == 12.346
    assert shown["route"] == [{"model": m, "rows": n} for m, n in RESULT.route]
    for name, array in RESULT.outputs.items():
        assert shown["outputs"][name] == {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "data": array.tolist(),
        }


def test_a_result_as_text_names_the_executor_and_the_selected_models() -> None:
    lines = _render.result_text(RESULT, total_ms=12.3).splitlines()
    assert lines[0] == "job job-1 model digits-mlp"
    assert lines[1] == "selected digits-logreg (3 rows), digits-mlp (1 rows)"
    assert lines[2] == f"executed by {RESULT.executor}"
    assert lines[3] == "queue 1.23 ms, compute 4.50 ms, total 12.30 ms"
    assert lines[4].startswith("label int64 [2]: [3 7]")
    unrouted = dataclasses.replace(RESULT, route=())
    assert not any(line.startswith("selected") for line in _render.result_text(unrouted, 1.0))


def test_a_placement_table_ranks_candidates_then_the_excluded() -> None:
    header, *rows = _render.placement_text(PLACEMENT).splitlines()
    assert header.split() == ["rank", "peer", "score", "reason"]
    assert [row.split()[:3] for row in rows] == [
        ["1", "peer-a", "0.5"],
        ["2", "peer-bb", "1.25"],
        ["-", "peer-c", "excluded"],
    ]
    empty = Placement("digits-mlp", ())
    assert _render.placement_text(empty) == "no known peer serves digits-mlp"


def test_a_placement_as_json_keeps_scores_and_reasons() -> None:
    shown = json.loads(_render.placement_json(PLACEMENT, "least_loaded"))
    assert shown["model"] == "digits-mlp" and shown["strategy"] == "least_loaded"
    assert shown["candidates"] == [dataclasses.asdict(c) for c in PLACEMENT.candidates]
    assert shown["excluded"] == [
        {"peer_id": e.peer_id, "reason": e.reason} for e in PLACEMENT.excluded
    ]


def test_a_selection_as_json_carries_every_field_learned() -> None:
    shown = json.loads(_render.selection_json(SELECTION, [LEARNED]))
    assert (shown["task"], shown["strategy"], shown["bucket"]) == (
        "image-classification",
        "hybrid",
        "len<=64",
    )
    assert shown["ranked"] == [
        {"model": "digits-logreg", "score": 0.9, "reasons": ["cheapest", "accurate"]}
    ]
    assert shown["excluded"] == [{"model": "digits-forest", "reason": "input_length <= 32"}]
    (learned,) = shown["learned"]
    expected = dataclasses.asdict(LEARNED)
    expected["model"] = expected.pop("model_id")
    assert learned == expected
    assert list(learned) == [  # the order `select --json` has always written
        *("model", "bucket", "runs", "failures", "latency_ms"),
        *("success_rate", "quality", "quality_weight"),
    ]


def test_a_selection_table_says_how_it_chose() -> None:
    header, columns, first, left_out = _render.selection_text(SELECTION).splitlines()
    assert header == "hybrid for image-classification (context len<=64)"
    assert columns.split() == ["rank", "model", "score", "reasons"]
    assert first.split(maxsplit=3) == ["1", "digits-logreg", "0.9", "cheapest; accurate"]
    assert left_out.split()[:4] == ["-", "digits-forest", "left", "out"]
    assert left_out.endswith("  input_length <= 32")


def test_peers_as_json_show_the_record_as_it_came() -> None:
    report = PeerReport(REALISTIC, 2.34567, "alive")
    (shown,) = json.loads(_render.peers_json([report]))["peers"]
    assert shown["peer_id"] == REALISTIC.peer_id and shown["state"] == "alive"
    assert shown["record_age_s"] == 2.346
    assert shown["addrs"] == list(REALISTIC.addrs)
    assert shown["load"]["in_flight"] == REALISTIC.load.in_flight
    assert shown["load"]["gpu_utilization"] == list(REALISTIC.load.gpu_utilization)
    assert [m["id"] for m in shown["models"]] == [m.descriptor.id for m in REALISTIC.models]
    assert [m["loaded"] for m in shown["models"]] == [m.loaded for m in REALISTIC.models]
    assert [g["name"] for g in shown["gpus"]] == [g.name for g in REALISTIC.capabilities.gpus]
    assert shown["providers"] == list(REALISTIC.capabilities.providers)


def test_a_peers_table_has_a_line_per_peer() -> None:
    assert _render.peers_text([]) == "no peers known"
    reports = [PeerReport(REALISTIC, 1.0, "alive"), PeerReport(BARE, 30.0, "suspect")]
    header, busy, bare = _render.peers_text(reports).splitlines()
    assert header.split()[:4] == ["peer", "state", "age", "load"]
    load = REALISTIC.load
    assert f"{load.in_flight} running + {load.queue_length} queued" in busy
    assert f"{load.cpu_percent:.0f}% cpu" in busy and "suspect" in bare
    assert ",".join(m.descriptor.id for m in REALISTIC.models) in busy
    assert bare.split()[-1] == "-"  # no gpus, no addresses: the gpu column shows "-"


def test_models_show_their_specs_as_people_read_them() -> None:
    models = [entry.descriptor for entry in REALISTIC.models[:2]]
    shown = json.loads(_render.models_json(models))
    assert [m["id"] for m in shown] == [m.id for m in models]
    assert shown[0]["inputs"] == [s.describe() for s in models[0].inputs]
    assert shown[0]["outputs"] == [s.describe() for s in models[0].outputs]
    header, *rows = _render.models_text(models).splitlines()
    assert header.split()[:2] == ["model", "version"] and len(rows) == 2
    assert rows[0].startswith(models[0].id) and models[0].inputs[0].describe() in rows[0]


def test_a_batch_summary_counts_rows_and_jobs_per_peer() -> None:
    batch = BatchResult({"label": np.arange(7)}, {"peer-b": 2, "peer-a": 1}, 3)
    shown = json.loads(_render.batch_json("digits-svm", batch, 1.23456, Path("out.npz")))
    assert shown == {
        "model": "digits-svm",
        "rows": 7,
        "chunks": 3,
        "seconds": 1.235,
        "chunks_by_executor": {"peer-b": 2, "peer-a": 1},
        "output": "out.npz",
    }
    assert _render.batch_text(batch, 1.23456, Path("out.npz")).splitlines() == [
        "7 rows in 3 jobs, 1.23 s, written to out.npz",
        "  peer-a: 1 jobs",
        "  peer-b: 2 jobs",
    ]


@pytest.mark.parametrize(("done", "filled"), [(0, 0), (150, 15), (300, 30)])
def test_the_progress_bar_fills_in_proportion(done: int, filled: int) -> None:
    bar = _render.progress_bar(done, 300)
    width = _render.PROGRESS_WIDTH
    assert bar == f"[{'#' * filled}{'.' * (width - filled)}] {done}/300 rows"


def test_feedback_names_the_models_credited() -> None:
    text = _render.feedback_text("job-1", 1.0, ("digits-logreg", "digits-mlp"))
    assert text == "job job-1: score 1 credited to digits-logreg, digits-mlp"
