"""`p2p-node`, the command line: its flags, and what each command does with them.

`start` runs a node until SIGINT or SIGTERM (its flags, or some of them, may
come from a TOML file: `--config`). `submit` runs a job (one model or task, or
a batch of rows), `place` and `select` show where a job would run and which
models a task would get, `feedback` scores a job's answer, `models` and
`peers` show what a node serves and sees, `top` keeps showing it with the
node's job rates and latencies; each of these is a client of the node named by
`--peer`. `demo` runs a small network in one process, `keygen` writes a private
network key or a client identity.

What they print is built in `_render.py`. A failure that is the user's or the
network's (USER_ERRORS) is one line on stderr and exit 1; a flag the parser
refuses, or a combination of flags that makes no sense, is argparse's usage
line and message, exit 2, as is a bad config file (one line naming the file
and the key). A reader that goes away (`p2p-node peers --json | head -c 100`)
ends the command quietly, exit 141, as a program killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import trio

from scheduler import DistributionStrategy, GpuNeed, JobError, Requirements, offers_from_ids
from selection import CONTEXT_KEYS, AdvancedModelSelectionStrategy

from . import _render
from ._client import Client
from ._config import (
    DEFAULT_TARGET_DEGREE,
    AdmissionConfig,
    ConfigError,
    ExecutorConfig,
    FetchConfig,
    GossipConfig,
    NodeConfig,
    load_bootstrap_file,
    load_client_allowlist,
    parse_fetch_target,
    parse_host_port,
)
from ._errors import leaves
from ._executor import UNNAMED_INPUT
from ._fetch import node_fetches, progress_json, progress_text
from ._flags import (
    COUNT,
    POSITIVE,
    FlagFileError,
    Number,
    multiaddr_text,
    network_name,
    peer_id_text,
    peer_multiaddr_text,
    read_flag_file,
    without_defaults,
)
from ._identity import IdentityError, create_identity_file, load_identity_file, peer_id_of
from ._logging import LOG_FORMATS, LOG_LEVELS, configure_logging
from ._node import open_node
from ._process import tune_process
from ._psk import PskError, read_psk_file, write_new_psk_file
from ._repository import RepositoryError
from ._top import DEFAULT_INTERVAL_S, run_top

DEFAULT_BOOTSTRAP_FILE = Path("bootstrap_peers.toml")
STRATEGIES = [s.value for s in DistributionStrategy]
SELECTIONS = [s.value for s in AdvancedModelSelectionStrategy]
DEFAULT_DATA_DIR = Path.home() / ".p2p-node"
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE  # 141: what a shell reports for a SIGPIPE death
USAGE_EXIT = 2  # argparse's own, for flags it refuses
_DEFAULTS = ExecutorConfig()
_GOSSIP_DEFAULTS = GossipConfig()
_NODE_DEFAULTS = NodeConfig(data_dir=Path())


class InputFileError(ValueError):
    """The --input file cannot be read as tensors."""


# Failures that are the user's or the network's, not bugs: one line, no traceback.
USER_ERRORS = (JobError, ConfigError, RepositoryError, IdentityError, InputFileError, PskError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status."""
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()  # a reader gone shows here, not in the flush at exit
    except BrokenPipeError:
        return _reader_gone()
    except BaseExceptionGroup as group:
        if not all(isinstance(e, BrokenPipeError) for e in leaves(group)):
            raise
        return _reader_gone()
    return code


def _reader_gone() -> int:
    # Python flushes stdout again at exit, and would report that one failing too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT


def _main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except FlagFileError as error:
        print(f"p2p-node start: {error}", file=sys.stderr)
        return USAGE_EXIT
    configure_logging(args.log_level, args.log_format, quiet_libp2p=args.command != "start")
    try:
        code: int = trio.run(args.run, args)
    except USER_ERRORS as error:
        print(f"p2p-node {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command and its flags, those of a `start --config` file included (a flag
    on the command line wins over the file). A flag argparse refuses, or a
    combination of flags that makes no sense, exits 2 with the usage line; a bad
    config file raises FlagFileError."""
    args = _parser().parse_args(argv)
    if getattr(args, "config", None) is not None:
        from_file = read_flag_file(args.config, args.command_parser)
        given = vars(without_defaults(_parser()).parse_args(argv))
        for dest, value in from_file.items():
            if dest not in given:
                setattr(args, dest, value)
    problem = args.check(args)
    if problem is not None:
        args.command_parser.error(problem)
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p-node",
        description="A peer-to-peer network of symmetric nodes that run ONNX models.",
    )
    _add_log_options(parser, given_only=False)
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="run a node until SIGINT/SIGTERM")
    _add_start_options(start)
    start.set_defaults(run=_start)

    submit = commands.add_parser("submit", help="run a model (or a task) on the network")
    _add_submit_options(submit)
    submit.set_defaults(run=_submit, check=_submit_flag_error)

    generate = commands.add_parser("generate", help="generate text, printed as it comes")
    _add_generate_options(generate)
    generate.set_defaults(run=_generate, check=_generate_flag_error)

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

    top = commands.add_parser("top", help="a live view of the network as a node sees it")
    top.add_argument("--peer", required=True, metavar="MADDR")
    top.add_argument(
        "--interval",
        type=POSITIVE,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"between refreshes (default {DEFAULT_INTERVAL_S:g}); q or Ctrl-C quits",
    )
    top.set_defaults(run=_top)

    demo = commands.add_parser("demo", help="a local network answering jobs")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument(
        "--stages",
        action="store_true",
        help="models bigger than any node's memory budget, served through chains of stages",
    )
    _add_psk_option(demo)
    demo.set_defaults(run=_demo)

    keygen = commands.add_parser("keygen", help="write a private network key or an identity")
    keygen.add_argument("--psk", type=Path, metavar="FILE", help="new private network key")
    keygen.add_argument(
        "--identity", type=Path, metavar="FILE", help="new client identity; prints its peer id"
    )
    keygen.set_defaults(run=_keygen, check=_keygen_flag_error)

    shard = commands.add_parser("shard", help="split a model into stages at layer boundaries")
    shard.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory")
    shard.add_argument("--stages", type=int, required=True, metavar="K", help="how many stages")
    shard.add_argument("--out", type=Path, required=True, metavar="DIR", help="repository to write")
    shard.set_defaults(run=_shard)
    for client_command in (submit, generate, place, select, feedback, models, peers, top):
        _add_psk_option(client_command)
        client_command.add_argument(
            "--identity",
            type=Path,
            metavar="FILE",
            help="client identity from `p2p-node keygen --identity` (default: a new one)",
        )
    for command in commands.choices.values():
        _add_log_options(command, given_only=True)
        command.set_defaults(command_parser=command)
        if command.get_default("check") is None:
            command.set_defaults(check=_no_flag_error)
    return parser


def _add_log_options(parser: argparse.ArgumentParser, *, given_only: bool) -> None:
    """--log-level and --log-format: before the command, with their defaults; or
    after it (`given_only`), where they set nothing unless given."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS if given_only else "warning",
        help="log this and above, to stderr (default warning)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS if given_only else "text",
        help="text lines, or one JSON object per line (default text)",
    )


def _add_start_options(start: argparse.ArgumentParser) -> None:
    start.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a TOML file of these flags, each under its name: `model-memory-mb = 512`; "
        "a flag given here wins over the file",
    )
    start.add_argument(
        "--listen",
        action="append",
        type=multiaddr_text,
        metavar="MADDR",
        help="address to listen on (repeatable; default /ip4/0.0.0.0/tcp/4001)",
    )
    start.add_argument(
        "--announce",
        action="append",
        type=multiaddr_text,
        metavar="MADDR",
        help="address peers should dial, e.g. a NAT's public one (repeatable); replaces "
        "the listen addresses in this node's record",
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
        type=peer_multiaddr_text,
        default=[],
        metavar="MADDR",
        help="a peer to dial, ending in /p2p/<peer id> (repeatable)",
    )
    start.add_argument(
        "--workers", type=COUNT, default=_DEFAULTS.workers, help="concurrent ONNX runs"
    )
    start.add_argument(
        "--threads", type=COUNT, default=_DEFAULTS.intra_op_threads, help="threads per ONNX run"
    )
    start.add_argument(
        "--queue-limit",
        type=COUNT,
        default=_DEFAULTS.queue_limit,
        help="admitted requests before answering OVERLOADED",
    )
    _add_limit_options(start)
    start.add_argument(
        "--network",
        type=network_name,
        default=_GOSSIP_DEFAULTS.network,
        help="network name: nodes only gossip with the same name",
    )
    start.add_argument(
        "--interval",
        type=POSITIVE,
        default=_GOSSIP_DEFAULTS.interval,
        help="a neighbour silent for 3 intervals is reported departed (beats go every 1.5 "
        "intervals), and the least time between records while the network is small",
    )
    start.add_argument(
        "--refresh",
        type=POSITIVE,
        default=_GOSSIP_DEFAULTS.refresh,
        help="seconds between records when nothing changes",
    )
    start.add_argument(
        "--degree",
        type=Number(integer=True, least=0),
        default=DEFAULT_TARGET_DEGREE,
        help="connections to hold beyond the bootstrap peers",
    )
    start.add_argument("--mdns", action="store_true", help="discover peers on the LAN")
    start.add_argument(
        "--fetch",
        action="append",
        type=fetch_target,
        default=[],
        metavar="MODEL_ID[@STAGE]",
        help="fetch this model (or one stage of it) from peers that announce it, then "
        "serve it; kept in the data dir (repeatable)",
    )
    start.add_argument(
        "--fetch-max-mb",
        type=POSITIVE,
        default=FetchConfig().max_model_mb,
        metavar="MB",
        help="refuse to fetch a model whose files total more than this",
    )
    _add_psk_option(start)
    start.add_argument(
        "--allow-client",
        action="append",
        type=peer_id_text,
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
        "--job-rate",
        type=POSITIVE,
        metavar="JOBS_PER_S",
        help="jobs/s per client (default: no limit)",
    )
    start.add_argument(
        "--job-burst",
        type=COUNT,
        default=AdmissionConfig().job_burst,
        help="jobs per client at once",
    )
    start.add_argument(
        "--metrics-listen",
        type=host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: not served)",
    )


def _add_limit_options(start: argparse.ArgumentParser) -> None:
    start.add_argument(
        "--model-memory-mb",
        type=POSITIVE,
        metavar="MB",
        help="keep loaded models within this memory, unloading the least recently used "
        "(default: no limit)",
    )
    start.add_argument(
        "--no-batch-decode",
        action="store_true",
        help="run each generation's decode steps alone, not batched with those of the "
        "other sessions of its model (whole or stage; for comparing)",
    )
    start.add_argument(
        "--max-batch-rows",
        type=COUNT,
        default=_DEFAULTS.max_batch_rows,
        metavar="ROWS",
        help="rows per request before answering INVALID_INPUT",
    )
    start.add_argument(
        "--max-request-bytes",
        type=Number(integer=True, least=1024),
        default=_NODE_DEFAULTS.max_request_bytes,
        metavar="BYTES",
        help="largest job or infer request taken; replies may be as large",
    )
    start.add_argument(
        "--max-inbound-streams",
        type=COUNT,
        default=_NODE_DEFAULTS.max_concurrent_inbound,
        metavar="N",
        help="streams from peers served at once before answering OVERLOADED",
    )
    start.add_argument(
        "--max-sessions",
        type=COUNT,
        default=_DEFAULTS.max_sessions,
        metavar="N",
        help="text generations running at once before answering OVERLOADED",
    )
    start.add_argument(
        "--max-new-tokens",
        type=COUNT,
        default=_DEFAULTS.max_new_tokens,
        metavar="N",
        help="tokens one generation may ask for before answering INVALID_INPUT",
    )
    start.add_argument(
        "--session-idle-s",
        type=POSITIVE,
        default=_DEFAULTS.session_idle_s,
        metavar="SECONDS",
        help="a generation whose client takes no token this long ends, freeing its cache",
    )


def _add_submit_options(submit: argparse.ArgumentParser) -> None:
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
        type=Path,
        metavar="FILE",
        help=".npy (single-input model) or .json {input name: nested list}",
    )
    submit.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text for a text model, instead of --input (repeatable)",
    )
    submit.add_argument(
        "--texts-file",
        type=Path,
        metavar="FILE",
        help="texts for a text model, one per line (UTF-8; blank lines skipped)",
    )
    submit.add_argument(
        "--truncate",
        action="store_true",
        help="a text longer than the model's window is cut to it (with --task: "
        "run on the largest window when none is long enough)",
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


def _add_context_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"selection context (repeatable); keys: {', '.join(CONTEXT_KEYS)}",
    )


def _add_psk_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--psk",
        type=Path,
        metavar="FILE",
        help="private network key (swarm.key): only peers holding it can connect",
    )


# --- flags that go together ----------------------------------------------------------------


def _no_flag_error(args: argparse.Namespace) -> str | None:
    return None


def _submit_flag_error(args: argparse.Namespace) -> str | None:
    """What is wrong with this combination of `submit` flags, if anything."""
    has_texts = bool(args.text) or args.texts_file is not None
    if (args.input is None) == (not has_texts):
        return "give --input FILE, or texts: --text TEXT and/or --texts-file FILE"
    if has_texts and (args.batch_size is not None or args.outputs is not None):
        return "--batch-size and --outputs go with --input"
    if args.truncate and not has_texts:
        return "--truncate goes with --text or --texts-file"
    if args.outputs is not None:
        if args.model is None:
            return "--outputs goes with --model"
        if not _output_names(args.outputs):
            return "--outputs needs at least one output name"
    if args.task is None and (args.selection or args.context):
        return "--selection and --context go with --task"
    if args.batch_size is None:
        if args.output is not None:
            return "--output goes with --batch-size"
        if args.via_node:
            return "--via-node goes with --batch-size"
        return None
    if args.model is None:
        return "--batch-size goes with --model"
    if args.output is None or args.output.suffix not in (".npy", ".npz"):
        return "--batch-size needs --output FILE.npy or FILE.npz"
    return None


def _add_generate_options(generate: argparse.ArgumentParser) -> None:
    generate.add_argument(
        "--peer",
        required=True,
        metavar="MADDR",
        help="node to send the generation to; it places it on a peer serving the model",
    )
    what = generate.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="ID")
    what.add_argument("--task", metavar="TYPE", help="let the node select the model")
    generate.add_argument("--prompt", required=True, metavar="TEXT")
    generate.add_argument("--max-tokens", type=COUNT, default=64, metavar="N")
    generate.add_argument(
        "--temperature",
        type=Number(integer=False, least=0),
        default=0.0,
        help="0 (the default): greedy; above it, sampling",
    )
    generate.add_argument(
        "--top-k", type=Number(integer=True, least=0), default=0, help="0: every token"
    )
    generate.add_argument(
        "--top-p", type=Number(integer=False, above=0), default=1.0, help="in (0, 1]"
    )
    generate.add_argument(
        "--seed", type=Number(integer=True, least=0), help="the same seed, the same text"
    )
    generate.add_argument(
        "--selection", choices=SELECTIONS, help="with --task: how to select (node's default)"
    )
    _add_context_argument(generate)
    generate.add_argument("--timeout", type=POSITIVE, default=120.0, help="seconds")
    generate.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end: text, tokens, peer, ttft and total ms",
    )


def _generate_flag_error(args: argparse.Namespace) -> str | None:
    if args.task is None and (args.selection or args.context):
        return "--selection and --context go with --task"
    if args.top_p > 1:
        return "--top-p must be in (0, 1]"
    return None


def _keygen_flag_error(args: argparse.Namespace) -> str | None:
    if not (args.psk or args.identity):
        return "say what to write: --psk FILE, --identity FILE, or both"
    return None


def _output_names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


# --- start ---------------------------------------------------------------------------


async def _start(args: argparse.Namespace) -> int:
    config = _node_config(args)
    tune_process()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            for addr in node.addrs:
                print(f"listening on {addr}", flush=True)
            if node.metrics_addr is not None:
                host, port = node.metrics_addr
                print(f"metrics on http://{_url_host(host)}:{port}/metrics", flush=True)
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
        announce=tuple(args.announce or ()),
        models_dir=args.models,
        serve_models=frozenset(args.serve) if args.serve else None,
        bootstrap=(*bootstrap, *args.bootstrap),
        executor=ExecutorConfig(
            workers=args.workers,
            intra_op_threads=args.threads,
            queue_limit=args.queue_limit,
            model_memory_mb=args.model_memory_mb,
            max_batch_rows=args.max_batch_rows,
            max_sessions=args.max_sessions,
            max_new_tokens=args.max_new_tokens,
            session_idle_s=args.session_idle_s,
            batch_decode=not args.no_batch_decode,
        ),
        max_request_bytes=args.max_request_bytes,
        max_reply_bytes=max(args.max_request_bytes, _NODE_DEFAULTS.max_reply_bytes),
        max_concurrent_inbound=args.max_inbound_streams,
        gossip=GossipConfig(network=args.network, interval=args.interval, refresh=args.refresh),
        target_degree=args.degree,
        mdns=args.mdns,
        psk=read_psk_file(args.psk) if args.psk else None,
        admission=_admission_config(args),
        metrics_listen=args.metrics_listen,
        fetch=FetchConfig(models=tuple(args.fetch), max_model_mb=args.fetch_max_mb),
    )


def fetch_target(text: str) -> str:
    """An argparse type: MODEL_ID or MODEL_ID@STAGE."""
    try:
        parse_fetch_target(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def host_port(text: str) -> tuple[str, int]:
    """An argparse type: HOST:PORT."""
    try:
        return parse_host_port(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _admission_config(args: argparse.Namespace) -> AdmissionConfig:
    clients = set(args.allow_client)
    if args.allow_clients_file:
        clients |= load_client_allowlist(args.allow_clients_file)
    listed = args.allow_client or args.allow_clients_file
    return AdmissionConfig(
        allowed_clients=frozenset(clients) if listed else None,
        job_rate=args.job_rate,
        job_burst=args.job_burst,
    )


# --- the client commands -------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> AbstractAsyncContextManager[Client]:
    """`Client.connect` to `--peer`, with the `--psk` and `--identity` given."""
    return Client.connect(
        args.peer,
        psk=read_psk_file(args.psk) if args.psk else None,
        identity=load_identity_file(args.identity) if args.identity else None,
    )


async def _submit(args: argparse.Namespace) -> int:
    texts = _texts(args)
    inputs = None if texts is not None else read_input_file(args.input)
    strategy = DistributionStrategy(args.strategy) if args.strategy else None
    outputs = _output_names(args.outputs)
    if args.batch_size is not None and inputs is not None:
        return await _submit_batch(args, inputs, strategy, outputs)
    async with _connect(args) as client:
        started = trio.current_time()
        if args.task is not None:
            context = parse_context(args.context)
            if args.truncate:
                context["truncate"] = "true"
            result = await client.submit_task(
                args.task,
                inputs,
                texts=texts,
                selection=args.selection,
                context=context,
                timeout=args.timeout,
                strategy=strategy,
                hedge=args.hedge,
            )
        else:
            result = await client.submit(
                args.model,
                inputs,
                texts=texts,
                truncate=args.truncate,
                timeout=args.timeout,
                strategy=strategy,
                hedge=args.hedge,
                outputs=outputs,
            )
        total_ms = (trio.current_time() - started) * 1e3
    render = _render.result_json if args.json else _render.result_text
    print(render(result, total_ms))
    return 0


def _texts(args: argparse.Namespace) -> list[str] | None:
    """The texts of `--text` and `--texts-file`, in that order; None for a tensor job."""
    if not args.text and args.texts_file is None:
        return None
    texts = list(args.text)
    if args.texts_file is not None:
        try:
            lines = args.texts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputFileError(f"cannot read texts from {args.texts_file}: {error}") from None
        texts += [line for line in lines if line.strip()]
    return texts


async def _generate(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        async with client.generate(
            args.prompt,
            args.model,
            task=args.task,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            selection=args.selection,
            context=parse_context(args.context),
            timeout=args.timeout,
        ) as generation:
            async for piece in generation:
                if not args.json:
                    print(piece, end="", flush=True)
    summary = generation.summary
    assert summary is not None  # read to the end
    if args.json:
        fields = {
            "job_id": summary.job_id,
            "model": summary.model_id,
            "text": summary.text,
            "tokens": summary.tokens,
            "finish": summary.finish,
            "executor": summary.executor,
            "ttft_ms": round(summary.ttft_ms, 3),
            "total_ms": round(summary.total_ms, 3),
        }
        print(json.dumps(fields, ensure_ascii=False))
        return 0
    shown = "".join(generation.pieces)
    print(summary.text[len(shown) :] if summary.text.startswith(shown) else "")
    print(
        f"{summary.tokens} tokens ({summary.finish}) by {summary.model_id} on "
        f"{summary.executor}; first token {summary.ttft_ms:.1f} ms, "
        f"total {summary.total_ms:.1f} ms",
        file=sys.stderr,
    )
    return 0


async def _submit_batch(
    args: argparse.Namespace,
    inputs: dict[str, np.ndarray[Any, Any]],
    strategy: DistributionStrategy | None,
    outputs: tuple[str, ...],
) -> int:
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
            outputs=outputs,
            on_progress=progress,
        )
        seconds = trio.current_time() - started
    progress.close()
    if args.output.suffix == ".npz":
        np.savez(args.output, **batch.outputs)  # type: ignore[arg-type]
    else:
        np.save(args.output, next(iter(batch.outputs.values())))
    if args.json:
        print(_render.batch_json(args.model, batch, seconds, args.output))
    else:
        print(_render.batch_text(batch, seconds, args.output))
    return 0


class _Progress:
    """A one-line progress bar on a terminal; nothing when stderr is not one."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._live = stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._live:
            self._stream.write(f"\r{_render.progress_bar(done, total)}")
            self._stream.flush()

    def close(self) -> None:
        if self._live:
            self._stream.write("\n")


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


def parse_context(pairs: Sequence[str]) -> dict[str, str]:
    """`["language=en", "input_length=64"]` -> a context map (values checked by the node)."""
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputFileError(f"--context takes KEY=VALUE, got {pair!r}")
        context[key.strip()] = value.strip()
    return context


async def _place(args: argparse.Namespace) -> int:
    requirements = Requirements(args.min_memory_mb, GpuNeed(args.gpu), args.provider)
    async with _connect(args) as client:
        placement = await client.place(
            args.model, DistributionStrategy(args.strategy), requirements=requirements
        )
        chain = None if args.json else await _place_chain(client, args.model)
    if args.json:
        print(_render.placement_json(placement, args.strategy))
    elif chain is None or placement.candidates:
        print(_render.placement_text(placement))
    if chain is not None:
        print(chain)
    return 0


async def _place_chain(client: Client, model_id: str) -> str | None:
    """How the model would run as a chain of stages, from the node's view (None: it
    is not served as stages)."""
    from scheduler import NodeInfo, estimate_whole, offers_from_ids, plan_chain

    peers = await client.peers()
    own = await client.models()
    offers = offers_from_ids(client.peer_id, [m.id for m in own])
    nodes = {client.peer_id: NodeInfo(client.peer_id, frozenset(), frozenset(m.id for m in own))}
    for report in peers:
        if report.state == "alive":
            info = NodeInfo.from_record(report.record)
            nodes[info.peer_id] = info
            offers += offers_from_ids(info.peer_id, [m.descriptor.id for m in report.record.models])
    plan = plan_chain(model_id, offers, nodes, {}, local_peer_id=client.peer_id)
    if plan is None:
        return None
    return _render.chain_text(plan, estimate_whole(model_id, nodes, {}, client.peer_id))


async def _select(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        chosen, learned = await client.select(
            args.task, args.strategy, context=parse_context(args.context), k=args.k
        )
    if args.json:
        print(_render.selection_json(chosen, learned))
    else:
        print(_render.selection_text(chosen))
    return 0


async def _feedback(args: argparse.Namespace) -> int:
    if not 0.0 <= args.score <= 1.0:
        raise InputFileError(f"--score must be in [0, 1], got {args.score}")
    async with _connect(args) as client:
        credited = await client.feedback(args.job, args.score)
    print(_render.feedback_text(args.job, args.score, credited))
    return 0


async def _models(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        models = await client.models()
    print(_render.models_json(models) if args.json else _render.models_text(models))
    return 0


async def _peers(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        peers = await client.peers()
        fetches = await node_fetches(client)
        own = [] if args.json else [m.id for m in await client.models()]
    if args.json:  # {"peers": [...], "fetches": [...]}
        print(_render.peers_json(peers, progress_json(fetches)))
        return 0
    print(_render.peers_text(peers))
    if chains := _render.chains_text(peers, offers_from_ids(client.peer_id, own)):
        print(chains)
    if fetches:
        print(progress_text(fetches))
    return 0


async def _top(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        await run_top(client, interval=args.interval)
    return 0


# --- demo and keygen ------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.stages:
        from ._demo_stages import run_stage_demo

        notes, table = await run_stage_demo()
        print("\n".join(notes))
        print(_render.format_table(table))
        return 0
    rows = await run_demo(args.nodes, read_psk_file(args.psk) if args.psk else None)
    print(_render.format_table(rows))
    return 0


async def _shard(args: argparse.Namespace) -> int:
    from ._shard import ShardError, shard

    try:
        written = shard(args.model, args.stages, args.out)
    except (ShardError, RepositoryError) as error:
        print(f"p2p-node shard: {error}", file=sys.stderr)
        return 1
    for directory in written:
        print(f"wrote {directory}")
    return 0


async def _keygen(args: argparse.Namespace) -> int:
    if args.psk:
        psk = write_new_psk_file(args.psk)
        print(f"wrote private network key {psk.fingerprint} to {args.psk} (mode 0600)")
        print("give this file, by a safe channel, to every node and client of the network")
    if args.identity:
        peer_id = peer_id_of(create_identity_file(args.identity))
        print(f"wrote identity {peer_id} to {args.identity} (mode 0600)")
        print(f"nodes admit its jobs with: p2p-node start --allow-client {peer_id}")
    return 0
