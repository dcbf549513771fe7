"""`p2p-node`: start a node, submit jobs, list models, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import trio

from gossip import ModelDescriptor, descriptor_to_wire
from scheduler import DistributionStrategy, GpuNeed, InferenceResult, JobError, Requirements
from selection import CONTEXT_KEYS, AdvancedModelSelectionStrategy, Selection

from ._client import Client
from ._config import (
    DEFAULT_TARGET_DEGREE,
    AdmissionConfig,
    ConfigError,
    ExecutorConfig,
    GossipConfig,
    NodeConfig,
    check_peer_id,
    load_bootstrap_file,
    load_client_allowlist,
)
from ._executor import UNNAMED_INPUT
from ._identity import IdentityError, create_identity_file, load_identity_file, peer_id_of
from ._messages import Learned, PeerReport
from ._node import open_node
from ._psk import PskError, read_psk_file, write_new_psk_file
from ._repository import RepositoryError

DEFAULT_BOOTSTRAP_FILE = Path("bootstrap_peers.toml")
STRATEGIES = [s.value for s in DistributionStrategy]
SELECTIONS = [s.value for s in AdvancedModelSelectionStrategy]
DEFAULT_DATA_DIR = Path.home() / ".p2p-node"
_DEFAULTS = ExecutorConfig()
_GOSSIP_DEFAULTS = GossipConfig()
_NODE_DEFAULTS = NodeConfig(data_dir=Path())


class InputFileError(ValueError):
    """The --input file cannot be read as tensors."""


# Failures that are the user's or the network's, not bugs: one line, no traceback.
USER_ERRORS = (JobError, ConfigError, RepositoryError, IdentityError, InputFileError, PskError)


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
    _add_limit_options(start)
    start.add_argument(
        "--network",
        default=_GOSSIP_DEFAULTS.network,
        help="network name: nodes only gossip with the same name",
    )
    start.add_argument(
        "--interval",
        type=float,
        default=_GOSSIP_DEFAULTS.interval,
        help="a neighbour silent for 3 intervals is reported departed (beats go every 1.5 "
        "intervals), and the least time between records while the network is small",
    )
    start.add_argument(
        "--refresh",
        type=float,
        default=_GOSSIP_DEFAULTS.refresh,
        help="seconds between records when nothing changes",
    )
    start.add_argument(
        "--degree",
        type=int,
        default=DEFAULT_TARGET_DEGREE,
        help="connections to hold beyond the bootstrap peers",
    )
    start.add_argument("--mdns", action="store_true", help="discover peers on the LAN")
    _add_psk_option(start)
    start.add_argument(
        "--allow-client",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="take jobs only from these client peer ids (repeatable; default: anyone)",
    )
    start.add_argument(
        "--allow-clients-file",
        type=Path,
        metavar="FILE",
        help='TOML file with clients = ["PEER_ID", ...], added to --allow-client',
    )
    start.add_argument(
        "--job-rate", type=float, metavar="JOBS_PER_S", help="jobs/s per client (default: no limit)"
    )
    start.add_argument(
        "--job-burst", type=int, default=AdmissionConfig().job_burst, help="jobs per client at once"
    )
    start.set_defaults(run=_start)

    submit = commands.add_parser("submit", help="run a model (or a task) on the network")
    submit.add_argument(
        "--peer",
        required=True,
        action="append",
        metavar="MADDR",
        help="node to send the job to; repeat it to fail over to the next if one dies",
    )
    what = submit.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="ID")
    what.add_argument("--task", metavar="TYPE", help="let the node select the model")
    submit.add_argument(
        "--selection", choices=SELECTIONS, help="with --task: how to select (node's default)"
    )
    _add_context_argument(submit)
    submit.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="FILE",
        help=".npy (single-input model) or .json {input name: nested list}",
    )
    submit.add_argument("--timeout", type=float, default=30.0, help="seconds")
    submit.add_argument("--json", action="store_true", help="print one JSON object")
    submit.add_argument("--strategy", choices=STRATEGIES, help="placement (node's default)")
    submit.add_argument(
        "--hedge",
        action="store_true",
        help="also ask a second peer if the first is slower than its usual p95",
    )
    submit.add_argument(
        "--batch-size",
        type=int,
        metavar="ROWS",
        help="split the input's rows into jobs of this many rows",
    )
    submit.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="with --batch-size: .npy (first output) or .npz (all outputs)",
    )
    submit.add_argument(
        "--outputs",
        metavar="NAMES",
        help="with --model: only these outputs, comma-separated (default: all); "
        "they come back, and a batch writes them, in this order",
    )
    submit.add_argument("--concurrency", type=int, default=8, help="batch jobs at a time")
    submit.add_argument(
        "--via-node",
        action="store_true",
        help="with --batch-size: send every job to --peer, which places it (default: "
        "straight to the peers serving the model, as --peer ranks them)",
    )
    submit.set_defaults(run=_submit)

    place = commands.add_parser("place", help="rank where a model would run; runs nothing")
    place.add_argument("--peer", required=True, metavar="MADDR")
    place.add_argument("--model", required=True, metavar="ID")
    place.add_argument("--strategy", choices=STRATEGIES, default="least_loaded")
    place.add_argument("--min-memory-mb", type=int, default=0)
    place.add_argument("--gpu", choices=[g.value for g in GpuNeed], default="any")
    place.add_argument("--provider", help="an onnxruntime execution provider")
    place.add_argument("--json", action="store_true")
    place.set_defaults(run=_place)

    select = commands.add_parser(
        "select", help="rank the models a node would select for a task; runs nothing"
    )
    select.add_argument("--peer", required=True, metavar="MADDR")
    select.add_argument("--task", required=True, metavar="TYPE")
    select.add_argument("--strategy", choices=SELECTIONS, default="hybrid")
    select.add_argument("-k", type=int, help="at most this many models")
    _add_context_argument(select)
    select.add_argument("--json", action="store_true", help="with what the node learned")
    select.set_defaults(run=_select)

    feedback = commands.add_parser("feedback", help="score a job's answer, in [0, 1]")
    feedback.add_argument("--peer", required=True, metavar="MADDR", help="the job's node")
    feedback.add_argument("--job", required=True, metavar="ID")
    feedback.add_argument("--score", required=True, type=float, help="1 right, 0 wrong")
    feedback.set_defaults(run=_feedback)

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
    _add_psk_option(demo)
    demo.set_defaults(run=_demo)

    keygen = commands.add_parser("keygen", help="write a private network key or an identity")
    keygen.add_argument("--psk", type=Path, metavar="FILE", help="new private network key")
    keygen.add_argument(
        "--identity", type=Path, metavar="FILE", help="new client identity; prints its peer id"
    )
    keygen.set_defaults(run=_keygen)
    for client_command in (submit, place, select, feedback, models, peers):
        _add_psk_option(client_command)
        client_command.add_argument(
            "--identity",
            type=Path,
            metavar="FILE",
            help="client identity from `p2p-node keygen --identity` (default: a new one)",
        )
    return parser


def _add_limit_options(start: argparse.ArgumentParser) -> None:
    start.add_argument(
        "--model-memory-mb",
        type=float,
        metavar="MB",
        help="keep loaded models within this memory, unloading the least recently used "
        "(default: no limit)",
    )
    start.add_argument(
        "--max-batch-rows",
        type=int,
        default=_DEFAULTS.max_batch_rows,
        metavar="ROWS",
        help="rows per request before answering INVALID_INPUT",
    )
    start.add_argument(
        "--max-request-bytes",
        type=int,
        default=_NODE_DEFAULTS.max_request_bytes,
        metavar="BYTES",
        help="largest job or infer request taken; replies may be as large",
    )
    start.add_argument(
        "--max-inbound-streams",
        type=int,
        default=_NODE_DEFAULTS.max_concurrent_inbound,
        metavar="N",
        help="streams from peers served at once before answering OVERLOADED",
    )


def _add_context_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"selection context (repeatable); keys: {', '.join(CONTEXT_KEYS)}",
    )


def parse_context(pairs: Sequence[str]) -> dict[str, str]:
    """`["language=en", "input_length=64"]` -> a context map (values checked by the node)."""
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputFileError(f"--context takes KEY=VALUE, got {pair!r}")
        context[key.strip()] = value.strip()
    return context


def _add_psk_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--psk",
        type=Path,
        metavar="FILE",
        help="private network key (swarm.key): only peers holding it can connect",
    )


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
            workers=args.workers,
            intra_op_threads=args.threads,
            queue_limit=args.queue_limit,
            model_memory_mb=args.model_memory_mb,
            max_batch_rows=args.max_batch_rows,
        ),
        max_request_bytes=args.max_request_bytes,
        max_reply_bytes=max(args.max_request_bytes, _NODE_DEFAULTS.max_reply_bytes),
        max_concurrent_inbound=args.max_inbound_streams,
        gossip=GossipConfig(network=args.network, interval=args.interval, refresh=args.refresh),
        target_degree=args.degree,
        mdns=args.mdns,
        psk=read_psk_file(args.psk) if args.psk else None,
        admission=_admission_config(args),
    )


def _admission_config(args: argparse.Namespace) -> AdmissionConfig:
    clients = {check_peer_id(c) for c in args.allow_client}
    if args.allow_clients_file:
        clients |= load_client_allowlist(args.allow_clients_file)
    listed = args.allow_client or args.allow_clients_file
    return AdmissionConfig(
        allowed_clients=frozenset(clients) if listed else None,
        job_rate=args.job_rate,
        job_burst=args.job_burst,
    )


def _connect(args: argparse.Namespace) -> AbstractAsyncContextManager[Client]:
    """`Client.connect` to `--peer`, with the `--psk` and `--identity` given."""
    return Client.connect(
        args.peer,
        psk=read_psk_file(args.psk) if args.psk else None,
        identity=load_identity_file(args.identity) if args.identity else None,
    )


# --- submit and models -----------------------------------------------------------------


async def _submit(args: argparse.Namespace) -> int:
    inputs = read_input_file(args.input)
    strategy = DistributionStrategy(args.strategy) if args.strategy else None
    if args.outputs is not None and args.model is None:
        raise InputFileError("--outputs goes with --model")
    args.outputs = _output_names(args.outputs)
    if args.batch_size is not None:
        return await _submit_batch(args, inputs, strategy)
    if args.output is not None:
        raise InputFileError("--output goes with --batch-size")
    if args.task is None and (args.selection or args.context):
        raise InputFileError("--selection and --context go with --task")
    async with _connect(args) as client:
        started = trio.current_time()
        if args.task is not None:
            result = await client.submit_task(
                args.task,
                inputs,
                selection=args.selection,
                context=parse_context(args.context),
                timeout=args.timeout,
                strategy=strategy,
                hedge=args.hedge,
            )
        else:
            result = await client.submit(
                args.model,
                inputs,
                timeout=args.timeout,
                strategy=strategy,
                hedge=args.hedge,
                outputs=args.outputs,
            )
        total_ms = (trio.current_time() - started) * 1e3
    if args.json:
        print(json.dumps(_result_json(result, total_ms)))
    else:
        print(_result_text(result, total_ms))
    return 0


def _output_names(text: str | None) -> tuple[str, ...]:
    names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
    if text is not None and not names:
        raise InputFileError("--outputs needs at least one output name")
    return names


async def _submit_batch(
    args: argparse.Namespace,
    inputs: dict[str, np.ndarray[Any, Any]],
    strategy: DistributionStrategy | None,
) -> int:
    if args.output is None or args.output.suffix not in (".npy", ".npz"):
        raise InputFileError("--batch-size needs --output FILE.npy or FILE.npz")
    if args.model is None:
        raise InputFileError("--batch-size goes with --model")
    progress = _Progress(sys.stderr)
    async with _connect(args) as client:
        started = trio.current_time()
        batch = await client.submit_batch(
            args.model,
            inputs,
            batch_size=args.batch_size,
            strategy=strategy,
            timeout=args.timeout,
            concurrency=args.concurrency,
            direct=not args.via_node,
            outputs=args.outputs,
            on_progress=progress,
        )
        seconds = trio.current_time() - started
    progress.close()
    if args.output.suffix == ".npz":
        np.savez(args.output, **batch.outputs)  # type: ignore[arg-type]
    else:
        np.save(args.output, next(iter(batch.outputs.values())))
    rows = len(next(iter(batch.outputs.values())))
    summary = {
        "model": args.model,
        "rows": rows,
        "chunks": batch.chunks,
        "seconds": round(seconds, 3),
        "chunks_by_executor": batch.chunks_by_executor,
        "output": str(args.output),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{rows} rows in {batch.chunks} jobs, {seconds:.2f} s, written to {args.output}")
        for peer, chunks in sorted(batch.chunks_by_executor.items()):
            print(f"  {peer}: {chunks} jobs")
    return 0


class _Progress:
    """A one-line progress bar on a terminal; nothing when stderr is not one."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._live = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._live:
            filled = round(30 * done / total)
            bar = "#" * filled + "." * (30 - filled)
            self._stream.write(f"\r[{bar}] {done}/{total} rows")
            self._stream.flush()

    def close(self) -> None:
        if self._live:
            self._stream.write("\n")


async def _place(args: argparse.Namespace) -> int:
    requirements = Requirements(args.min_memory_mb, GpuNeed(args.gpu), args.provider)
    async with _connect(args) as client:
        placement = await client.place(
            args.model, DistributionStrategy(args.strategy), requirements=requirements
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": placement.model_id,
                    "strategy": args.strategy,
                    "candidates": [
                        {"peer_id": c.peer_id, "score": c.score, "reason": c.reason}
                        for c in placement.candidates
                    ],
                    "excluded": [
                        {"peer_id": e.peer_id, "reason": e.reason} for e in placement.excluded
                    ],
                }
            )
        )
        return 0
    if not placement.candidates and not placement.excluded:
        print(f"no known peer serves {args.model}")
        return 0
    rows = [("rank", "peer", "score", "reason")]
    rows += [
        (str(i + 1), c.peer_id, f"{c.score:.3g}", c.reason)
        for i, c in enumerate(placement.candidates)
    ]
    rows += [("-", e.peer_id, "excluded", e.reason) for e in placement.excluded]
    print(format_table(rows))
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
        "route": [{"model": model, "rows": rows} for model, rows in result.route],
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
    if result.route:
        lines.insert(1, "selected " + ", ".join(f"{m} ({n} rows)" for m, n in result.route))
    for name, array in result.outputs.items():
        values = np.array2string(array, precision=4, threshold=40, suppress_small=True)
        lines.append(f"{name} {array.dtype.name} {list(array.shape)}: {values}")
    return "\n".join(lines)


async def _select(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        chosen, learned = await client.select(
            args.task, args.strategy, context=parse_context(args.context), k=args.k
        )
    if args.json:
        print(json.dumps(_selection_json(chosen, learned)))
        return 0
    rows = [("rank", "model", "score", "reasons")]
    rows += [
        (str(i + 1), r.model_id, f"{r.score:.4g}", "; ".join(r.reasons))
        for i, r in enumerate(chosen.ranked)
    ]
    rows += [("-", x.model_id, "left out", x.reason) for x in chosen.excluded]
    print(f"{chosen.strategy} for {chosen.task_type} (context {chosen.bucket})")
    print(format_table(rows))
    return 0


def _selection_json(chosen: Selection, learned: Sequence[Learned]) -> dict[str, Any]:
    return {
        "task": chosen.task_type,
        "strategy": str(chosen.strategy),
        "bucket": chosen.bucket,
        "ranked": [
            {"model": r.model_id, "score": r.score, "reasons": list(r.reasons)}
            for r in chosen.ranked
        ],
        "excluded": [{"model": x.model_id, "reason": x.reason} for x in chosen.excluded],
        "learned": [
            {"model" if k == "model_id" else k: v for k, v in asdict(x).items()} for x in learned
        ],
    }


async def _feedback(args: argparse.Namespace) -> int:
    if not 0.0 <= args.score <= 1.0:
        raise InputFileError(f"--score must be in [0, 1], got {args.score}")
    async with _connect(args) as client:
        credited = await client.feedback(args.job, args.score)
    print(f"job {args.job}: score {args.score:g} credited to {', '.join(credited)}")
    return 0


async def _models(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        models = await client.models()
    if args.json:
        print(json.dumps([_model_json(m) for m in models]))
    else:
        print(_models_table(models))
    return 0


def _model_json(model: ModelDescriptor) -> dict[str, Any]:
    """The wire descriptor, with specs written as people read them (`input float32 [N, 64]`)."""
    return {
        **descriptor_to_wire(model),
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
    async with _connect(args) as client:
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
                f"{r.load.in_flight} running + {r.load.queue_length} queued, "
                f"{r.load.cpu_percent:.0f}% cpu",
                ",".join(m.descriptor.id for m in r.models) or "-",
                ",".join(g.name for g in r.capabilities.gpus) or "-",
                " ".join(r.addrs),
            )
        )
    return format_table(rows)


# --- demo -------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    rows = await run_demo(args.nodes, read_psk_file(args.psk) if args.psk else None)
    print(format_table(rows))
    return 0


async def _keygen(args: argparse.Namespace) -> int:
    if not (args.psk or args.identity):
        raise ConfigError("say what to write: --psk FILE, --identity FILE, or both")
    if args.psk:
        psk = write_new_psk_file(args.psk)
        print(f"wrote private network key {psk.fingerprint} to {args.psk} (mode 0600)")
        print("give this file, by a safe channel, to every node and client of the network")
    if args.identity:
        peer_id = peer_id_of(create_identity_file(args.identity))
        print(f"wrote identity {peer_id} to {args.identity} (mode 0600)")
        print(f"nodes admit its jobs with: p2p-node start --allow-client {peer_id}")
    return 0
