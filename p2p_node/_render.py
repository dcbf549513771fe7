"""What the command line prints: tables for people, JSON for programs.

Pure functions, values in and strings out; `_cli.py` parses the flags, asks the
node, and prints what these return. Each command's `--json` form is one JSON
object (or list) on one line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gossip import ModelDescriptor, descriptor_to_wire
from scheduler import ChainPlan, InferenceResult, Placement, StageOffer, complete_chains
from selection import Selection

from ._batch import BatchResult
from ._messages import Learned, PeerReport

PROGRESS_WIDTH = 30


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --- submit ------------------------------------------------------------------------------


def result_json(result: InferenceResult, total_ms: float) -> str:
    return json.dumps(
        {
            "job_id": result.job_id,
            "model": result.model_id,
            "executor": result.executor,
            "queue_ms": round(result.queue_ms, 3),
            "compute_ms": round(result.compute_ms, 3),
            "total_ms": round(total_ms, 3),
            "route": [{"model": model, "rows": rows} for model, rows in result.route],
            **({"labels": list(result.labels)} if result.labels else {}),
            **({"texts": list(result.texts)} if result.texts else {}),
            "outputs": {
                name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
                for name, a in result.outputs.items()
            },
        }
    )


def result_text(result: InferenceResult, total_ms: float) -> str:
    lines = [
        f"job {result.job_id} model {result.model_id}",
        f"executed by {result.executor}",
        f"queue {result.queue_ms:.2f} ms, compute {result.compute_ms:.2f} ms, "
        f"total {total_ms:.2f} ms",
    ]
    if result.route:
        lines.insert(1, "selected " + ", ".join(f"{m} ({n} rows)" for m, n in result.route))
    for name, array in result.outputs.items():
        values = np.array2string(array, precision=4, threshold=40, suppress_small=True)
        lines.append(f"{name} {array.dtype.name} {list(array.shape)}: {values}")
    if result.labels:
        lines.append(f"labels: {', '.join(result.labels)}")
    lines.extend(f"text {i}: {text!r}" for i, text in enumerate(result.texts))
    return "\n".join(lines)


def batch_json(model_id: str, batch: BatchResult, seconds: float, output: Path) -> str:
    return json.dumps(
        {
            "model": model_id,
            "rows": _batch_rows(batch),
            "chunks": batch.chunks,
            "seconds": round(seconds, 3),
            "chunks_by_executor": batch.chunks_by_executor,
            "output": str(output),
        }
    )


def batch_text(batch: BatchResult, seconds: float, output: Path) -> str:
    lines = [
        f"{_batch_rows(batch)} rows in {batch.chunks} jobs, {seconds:.2f} s, written to {output}"
    ]
    lines += [
        f"  {peer}: {chunks} jobs" for peer, chunks in sorted(batch.chunks_by_executor.items())
    ]
    return "\n".join(lines)


def _batch_rows(batch: BatchResult) -> int:
    return len(next(iter(batch.outputs.values())))


def progress_bar(done: int, total: int) -> str:
    """`[#######.......] 120/300 rows`, to be redrawn in place (no line end)."""
    filled = round(PROGRESS_WIDTH * done / total)
    return f"[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {done}/{total} rows"


# --- place and select ---------------------------------------------------------------------


def placement_json(placement: Placement, strategy: str) -> str:
    return json.dumps(
        {
            "model": placement.model_id,
            "strategy": strategy,
            "candidates": [
                {"peer_id": c.peer_id, "score": c.score, "reason": c.reason}
                for c in placement.candidates
            ],
            "excluded": [{"peer_id": e.peer_id, "reason": e.reason} for e in placement.excluded],
        }
    )


def placement_text(placement: Placement) -> str:
    if not placement.candidates and not placement.excluded:
        return f"no known peer serves {placement.model_id}"
    rows = [("rank", "peer", "score", "reason")]
    rows += [
        (str(i + 1), c.peer_id, f"{c.score:.3g}", c.reason)
        for i, c in enumerate(placement.candidates)
    ]
    rows += [("-", e.peer_id, "excluded", e.reason) for e in placement.excluded]
    return format_table(rows)


def selection_json(chosen: Selection, learned: Sequence[Learned]) -> str:
    return json.dumps(
        {
            "task": chosen.task_type,
            "strategy": str(chosen.strategy),
            "bucket": chosen.bucket,
            "ranked": [
                {"model": r.model_id, "score": r.score, "reasons": list(r.reasons)}
                for r in chosen.ranked
            ],
            "excluded": [{"model": x.model_id, "reason": x.reason} for x in chosen.excluded],
            "learned": [_learned_json(x) for x in learned],
        }
    )


def _learned_json(learned: Learned) -> dict[str, Any]:
    """Every field of `Learned`, in its order; `model_id` is called `model`, as elsewhere."""
    return {
        ("model" if f.name == "model_id" else f.name): getattr(learned, f.name)
        for f in dataclasses.fields(learned)
    }


def selection_text(chosen: Selection) -> str:
    rows = [("rank", "model", "score", "reasons")]
    rows += [
        (str(i + 1), r.model_id, f"{r.score:.4g}", "; ".join(r.reasons))
        for i, r in enumerate(chosen.ranked)
    ]
    rows += [("-", x.model_id, "left out", x.reason) for x in chosen.excluded]
    header = f"{chosen.strategy} for {chosen.task_type} (context {chosen.bucket})"
    return f"{header}\n{format_table(rows)}"


def feedback_text(job_id: str, score: float, credited: Sequence[str]) -> str:
    return f"job {job_id}: score {score:g} credited to {', '.join(credited)}"


# --- models and peers -----------------------------------------------------------------------


def models_json(models: Sequence[ModelDescriptor]) -> str:
    return json.dumps([_model_json(m) for m in models])


def _model_json(model: ModelDescriptor) -> dict[str, Any]:
    """The wire descriptor, with specs written as people read them (`input float32 [N, 64]`)."""
    return {
        **descriptor_to_wire(model),
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
    }


def models_text(models: Sequence[ModelDescriptor]) -> str:
    rows = [("model", "version", "task type", "accuracy", "cost", "inputs")]
    rows += [
        (
            m.id,
            m.version,
            m.task_type,
            f"{m.accuracy:.4f}",
            f"{m.cost:g}",
            "; ".join(s.describe() for s in m.inputs),
        )
        for m in models
    ]
    return format_table(rows)


def peers_json(peers: Sequence[PeerReport], fetches: Sequence[Mapping[str, Any]] = ()) -> str:
    """The view, and the node's own fetches (`_fetch.progress_json`)."""
    return json.dumps({"peers": [_peer_json(p) for p in peers], "fetches": list(fetches)})


def _peer_json(report: PeerReport) -> dict[str, Any]:
    record = report.record
    return {
        "peer_id": record.peer_id,
        "state": report.state,
        "record_age_s": round(report.age_s, 3),
        "addrs": list(record.addrs),
        "interval_s": record.interval,
        "load": {
            "in_flight": record.load.in_flight,
            "queue_length": record.load.queue_length,
            "cpu_percent": record.load.cpu_percent,
            "memory_available_mb": record.load.memory_available_mb,
            "gpu_utilization": list(record.load.gpu_utilization),
        },
        "models": [
            {"id": m.descriptor.id, "loaded": m.loaded, "task_type": m.descriptor.task_type}
            | (
                {"stage": {"parent": m.stage.parent, "index": m.stage.index, "k": m.stage.k}}
                if m.stage is not None
                else {}
            )
            for m in record.models
        ],
        "gpus": [{"name": g.name, "memory_mb": g.memory_mb} for g in record.capabilities.gpus],
        "cpu_count": record.capabilities.cpu_count,
        "providers": list(record.capabilities.providers),
    }


def peers_text(peers: Sequence[PeerReport]) -> str:
    if not peers:
        return "no peers known"
    rows = [("peer", "state", "age", "load", "models", "gpus", "addresses")]
    for report in peers:
        r = report.record
        rows.append(
            (
                r.peer_id,
                report.state,
                f"{report.age_s:.1f}s",
                f"{r.load.in_flight} running + {r.load.queue_length} queued, "
                f"{r.load.cpu_percent:.0f}% cpu",
                ",".join(m.descriptor.id for m in r.models) or "-",
                ",".join(g.name for g in r.capabilities.gpus) or "-",
                " ".join(r.addrs),
            )
        )
    return format_table(rows)


def chains_text(peers: Sequence[PeerReport], own: Sequence[StageOffer] = ()) -> str:
    """The models the view (and the node's `own` stages) can run as a chain of
    stages: each split whose every stage some alive peer serves, with its peers."""
    offers = [*own] + [
        StageOffer(m.stage.parent, m.stage.index, m.stage.k, m.descriptor.id, r.record.peer_id)
        for r in peers
        if r.state == "alive"
        for m in r.record.models
        if m.stage is not None
    ]
    chains = complete_chains(offers)
    if not chains:
        return ""
    lines = ["complete chains of stages:"]
    for (parent, k), serving in sorted(chains.items()):
        stages = "; ".join(f"stage {i + 1}: {', '.join(sorted(p))}" for i, p in enumerate(serving))
        lines.append(f"  {parent} in {k} stages: {stages}")
    return "\n".join(lines)


def chain_text(plan: ChainPlan, whole: tuple[float, str] | None) -> str:
    rows = [("stage", "peer", "model", "est ms", "reason")]
    rows += [
        (str(h.index + 1), h.peer_id, h.model_id, f"{h.compute_ms + h.hop_ms:.3g}", h.reason)
        for h in plan.hops
    ]
    verdict = f"chain of {plan.k} stages, estimated {plan.estimate_ms:.3g} ms" + (
        f"; whole on {whole[1]}: {whole[0]:.3g} ms: runs "
        + ("whole" if whole[0] <= plan.estimate_ms else "as the chain")
        if whole
        else "; no peer serves it whole"
    )
    return verdict + "\n" + format_table(rows)
