"""`p2p-node`: start a node, submit jobs, list models, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from gossip import ModelDescriptor
from scheduler import InferenceResult, JobError

from ._client import Client
from ._config import (
    DEFAULT_TARGET_DEGREE,
    ConfigError,
    ExecutorConfig,
    GossipConfig,
    NodeConfig,
    load_bootstrap_file,
)
from ._executor import UNNAMED_INPUT
from ._identity import IdentityError
from ._node import open_node
from ._repository import RepositoryError
from ._wire import PeerReport

DEFAULT_BOOTSTRAP_FILE = Path("bootstrap_peers.toml")
DEFAULT_DATA_DIR = Path.home() / ".p2p-node"
_DEFAULTS = ExecutorConfig()
_GOSSIP_DEFAULTS = GossipConfig()


class InputFileError(ValueError):
    """The --input file cannot be read as tensors."""


# Failures that are the user's or the network's, not bugs: one line, no traceback.
USER_ERRORS = (JobError, ConfigError, RepositoryError, IdentityError, InputFileError)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.log_level, quiet_libp2p=args.command != "start")
    try:
        code: int = trio.run(args.run, args)
    except USER_ERRORS as error:
        print(f"p2p-node {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-node", description=__doc__)
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="run a node until SIGINT/SIGTERM")
    start.add_argument(
        "--listen",
        action="append",
        metavar="MADDR",
        help="address to listen on (repeatable; default /ip4/0.0.0.0/tcp/4001)",
    )
    start.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"identity and state (default {DEFAULT_DATA_DIR})",
    )
    start.add_argument(
        "--models",
        type=Path,
        metavar="DIR",
        help="model repository (default: the bundled example models)",
    )
    start.add_argument(
        "--serve",
        action="append",
        metavar="MODEL_ID",
        help="serve only these models of the repository (repeatable)",
    )
    start.add_argument(
        "--bootstrap-file",
        type=Path,
        metavar="FILE",
        help="peers to dial (default ./bootstrap_peers.toml if present)",
    )
    start.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MADDR",
        help="a peer to dial, ending in /p2p/<peer id> (repeatable)",
    )
    start.add_argument(
        "--workers", type=int, default=_DEFAULTS.workers, help="concurrent ONNX runs"
    )
    start.add_argument(
        "--threads", type=int, default=_DEFAULTS.intra_op_threads, help="threads per ONNX run"
    )
    start.add_argument(
        "--queue-limit",
        type=int,
        default=_DEFAULTS.queue_limit,
        help="admitted requests before answering OVERLOADED",
    )
    start.add_argument(
        "--network",
        default=_GOSSIP_DEFAULTS.network,
        help="network name: nodes only gossip with the same name",
    )
    start.add_argument(
        "--interval",
        type=float,
        default=_GOSSIP_DEFAULTS.interval,
        help="seconds between records while the network is small",
    )
    start.add_argument(
        "--degree",
        type=int,
        default=DEFAULT_TARGET_DEGREE,
        help="connections to hold beyond the bootstrap peers",
    )
    start.add_argument("--mdns", action="store_true", help="discover peers on the LAN")
    start.set_defaults(run=_start)

    submit = commands.add_parser("submit", help="run a model on the network")
    submit.add_argument("--peer", required=True, metavar="MADDR", help="node to send the job to")
    submit.add_argument("--model", required=True, metavar="ID")
    submit.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="FILE",
        help=".npy (single-input model) or .json {input name: nested list}",
    )
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds")
    submit.add_argument("--json", action="store_true", help="print one JSON object")
    submit.set_defaults(run=_submit)

    models = commands.add_parser("models", help="list the models a node serves")
    models.add_argument("--peer", required=True, metavar="MADDR")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_models)

    peers = commands.add_parser("peers", help="show a node's view of the network")
    peers.add_argument("--peer", required=True, metavar="MADDR")
    peers.add_argument("--json", action="store_true")
    peers.set_defaults(run=_peers)

    demo = commands.add_parser("demo", help="a local network answering jobs")
    demo.add_argument("--nodes", type=int, default=3)
    demo.set_defaults(run=_demo)
    return parser


def _configure_logging(level: str, *, quiet_libp2p: bool) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level == "debug":
        return
    if quiet_libp2p:
        # A client's failures are reported as one line by us; libp2p's own
        # multi-line error logs would only repeat them.
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    else:
        # A node's pubsub tries every new connection, clients included, and logs
        # an error each time a client does not speak GossipSub.
        logging.getLogger("libp2p.host.basic_host").setLevel(logging.CRITICAL)


# --- start ---------------------------------------------------------------------------


async def _start(args: argparse.Namespace) -> int:
    config = _node_config(args)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            for addr in node.addrs:
                print(f"listening on {addr}", flush=True)
            async for signum in signals:
                logging.getLogger(__name__).info("%s: shutting down", signal.Signals(signum).name)
                break
    return 0


def _node_config(args: argparse.Namespace) -> NodeConfig:
    bootstrap_file = args.bootstrap_file
    if bootstrap_file is None and DEFAULT_BOOTSTRAP_FILE.is_file():
        bootstrap_file = DEFAULT_BOOTSTRAP_FILE
    bootstrap = load_bootstrap_file(bootstrap_file) if bootstrap_file else ()
    return NodeConfig(
        data_dir=args.data_dir,
        listen=tuple(args.listen or ["/ip4/0.0.0.0/tcp/4001"]),
        models_dir=args.models,
        serve_models=frozenset(args.serve) if args.serve else None,
        bootstrap=(*bootstrap, *args.bootstrap),
        executor=ExecutorConfig(
            workers=args.workers, intra_op_threads=args.threads, queue_limit=args.queue_limit
        ),
        gossip=GossipConfig(network=args.network, interval=args.interval),
        target_degree=args.degree,
        mdns=args.mdns,
    )


# --- submit and models -----------------------------------------------------------------


async def _submit(args: argparse.Namespace) -> int:
    inputs = read_input_file(args.input)
    async with Client.connect(args.peer) as client:
        started = trio.current_time()
        result = await client.submit(args.model, inputs, timeout=args.timeout)
        total_ms = (trio.current_time() - started) * 1e3
    if args.json:
        print(json.dumps(_result_json(result, total_ms)))
    else:
        print(_result_text(result, total_ms))
    return 0


def read_input_file(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """`.npy`: the single input of a model; `.json`: {input name: nested list}."""
    try:
        if path.suffix == ".npy":
            return {UNNAMED_INPUT: np.load(path, allow_pickle=False)}
        if path.suffix == ".json":
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or not document:
                raise InputFileError(f"{path}: expected an object of input name to nested list")
            return {str(k): np.asarray(v) for k, v in document.items()}
    except OSError as error:
        raise InputFileError(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, json.JSONDecodeError) as error:
        raise InputFileError(f"{path} is not a valid {path.suffix} tensor file: {error}") from None
    raise InputFileError(f"{path}: input must be a .npy or .json file")


def _result_json(result: InferenceResult, total_ms: float) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "model": result.model_id,
        "executor": result.executor,
        "queue_ms": round(result.queue_ms, 3),
        "compute_ms": round(result.compute_ms, 3),
        "total_ms": round(total_ms, 3),
        "outputs": {
            name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
            for name, a in result.outputs.items()
        },
    }


def _result_text(result: InferenceResult, total_ms: float) -> str:
    lines = [
        f"job {result.job_id} model {result.model_id}",
        f"executed by {result.executor}",
        f"queue {result.queue_ms:.2f} ms, compute {result.compute_ms:.2f} ms, "
        f"total {total_ms:.2f} ms",
    ]
    for name, array in result.outputs.items():
        values = np.array2string(array, precision=4, threshold=40, suppress_small=True)
        lines.append(f"{name} {array.dtype.name} {list(array.shape)}: {values}")
    return "\n".join(lines)


async def _models(args: argparse.Namespace) -> int:
    async with Client.connect(args.peer) as client:
        models = await client.models()
    if args.json:
        print(json.dumps([_model_json(m) for m in models]))
    else:
        print(_models_table(models))
    return 0


def _model_json(model: ModelDescriptor) -> dict[str, Any]:
    return {
        "id": model.id,
        "version": model.version,
        "sha256": model.sha256,
        "task_type": model.task_type,
        "subtypes": list(model.subtypes),
        "languages": list(model.languages),
        "max_input_length": model.max_input_length,
        "accuracy": model.accuracy,
        "cost": model.cost,
        "description": model.description,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
    }


def _models_table(models: Sequence[ModelDescriptor]) -> str:
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


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _peers(args: argparse.Namespace) -> int:
    async with Client.connect(args.peer) as client:
        peers = await client.peers()
    if args.json:
        print(json.dumps([_peer_json(p) for p in peers]))
    else:
        print(_peers_table(peers) if peers else "no peers known")
    return 0


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
            for m in record.models
        ],
        "gpus": [{"name": g.name, "memory_mb": g.memory_mb} for g in record.capabilities.gpus],
        "cpu_count": record.capabilities.cpu_count,
        "providers": list(record.capabilities.providers),
    }


def _peers_table(peers: Sequence[PeerReport]) -> str:
    rows = [("peer", "state", "age", "load", "models", "gpus", "addresses")]
    for report in peers:
        r = report.record
        rows.append(
            (
                r.peer_id,
                report.state,
                f"{report.age_s:.1f}s",
                f"{r.load.in_flight} in flight, {r.load.cpu_percent:.0f}% cpu",
                ",".join(m.descriptor.id for m in r.models) or "-",
                ",".join(g.name for g in r.capabilities.gpus) or "-",
                " ".join(r.addrs),
            )
        )
    return format_table(rows)


# --- demo -------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    rows = await run_demo(args.nodes)
    print(format_table(rows))
    return 0
