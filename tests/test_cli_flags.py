"""The command line without a network: config files, flags that do not go together,
JSON logs, and a reader that goes away."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_cli import CLI

from p2p_node import bundled_models_dir
from p2p_node._cli import BROKEN_PIPE_EXIT, _node_config, main, parse_args
from p2p_node._flags import FlagFileError, file_keys, read_flag_file
from p2p_node._logging import JsonFormatter
from p2p_node._psk import write_new_psk_file

README = Path(__file__).parent.parent / "README.md"
ALICE = "12D3KooWMgBawwNoAtxb9FuYT4E1bDZyZfE4EK1H3pzfU6f3vTdM"
BOB = "12D3KooWANguz1fnVvsm92NFqtdocT7j9tYe8ykqY5tixKLEVGwo"
START = parse_args(["start"]).command_parser


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- a config file --------------------------------------------------------------------


def test_a_config_file_gives_the_node_config_of_the_same_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, in the file as in flags, start here
    write_new_psk_file(tmp_path / "swarm.key")
    _write(tmp_path / "clients.toml", f'clients = ["{BOB}"]\n')
    _write(tmp_path / "peers.toml", "peers = []\n")
    models = bundled_models_dir()
    node_toml = _write(
        tmp_path / "node.toml",
        f"""
listen = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/4005"]
announce = ["/ip4/203.0.113.7/tcp/4001"]
data-dir = "node"
models = "{models}"
serve = ["digits-mlp", "digits-svm"]
bootstrap-file = "peers.toml"
bootstrap = ["/ip4/192.0.2.10/tcp/4001/p2p/{ALICE}"]
workers = 3
threads = 2
queue-limit = 10
model-memory-mb = 512
max-batch-rows = 1000
max-request-bytes = 2048
max-inbound-streams = 9
max-sessions = 3
no-batch-decode = true
max-new-tokens = 77
session-idle-s = 2.5
fetch = ["minilm-l6-v2", "pydoc-gpt-large@2"]
fetch-max-mb = 100
network = "lab"
interval = 0.5
refresh = 30
degree = 0
mdns = true
psk = "swarm.key"
allow-client = ["{ALICE}"]
allow-clients-file = "clients.toml"
job-rate = 2.5
job-burst = 7
metrics-listen = "127.0.0.1:9100"
log-level = "info"
log-format = "json"
""",
    )
    flags = [
        *("--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/tcp/4005"),
        *("--announce", "/ip4/203.0.113.7/tcp/4001"),
        *("--data-dir", "node", "--models", str(models)),
        *("--serve", "digits-mlp", "--serve", "digits-svm", "--bootstrap-file", "peers.toml"),
        *("--bootstrap", f"/ip4/192.0.2.10/tcp/4001/p2p/{ALICE}"),
        *("--workers", "3", "--threads", "2", "--queue-limit", "10"),
        *("--model-memory-mb", "512", "--max-batch-rows", "1000"),
        *("--max-request-bytes", "2048", "--max-inbound-streams", "9"),
        *("--max-sessions", "3", "--max-new-tokens", "77", "--session-idle-s", "2.5"),
        *("--fetch", "minilm-l6-v2", "--fetch", "pydoc-gpt-large@2", "--fetch-max-mb", "100"),
        *("--network", "lab", "--interval", "0.5", "--refresh", "30", "--degree", "0"),
        *("--mdns", "--no-batch-decode", "--psk", "swarm.key", "--allow-client", ALICE),
        *("--allow-clients-file", "clients.toml", "--job-rate", "2.5", "--job-burst", "7"),
        *("--metrics-listen", "127.0.0.1:9100"),
        *("--log-level", "info", "--log-format", "json"),
    ]
    # This test sets every key a config file may hold.
    assert set(tomllib.loads(node_toml.read_text())) == set(file_keys(START))
    from_file = parse_args(["start", "--config", str(node_toml)])
    from_flags = parse_args(["start", *flags])
    config = _node_config(from_file)
    assert config == _node_config(from_flags)
    assert config.executor.workers == 3 and config.admission.allowed_clients == {ALICE, BOB}
    assert (config.executor.max_sessions, config.executor.max_new_tokens) == (3, 77)
    assert config.executor.session_idle_s == 2.5 and not config.executor.batch_decode
    assert config.psk is not None and config.mdns and config.gossip.refresh == 30.0
    assert config.announce == ("/ip4/203.0.113.7/tcp/4001",)
    assert config.metrics_listen == ("127.0.0.1", 9100)
    assert config.fetch.models == ("minilm-l6-v2", "pydoc-gpt-large@2")
    assert config.fetch.max_model_mb == 100.0
    assert (from_file.log_level, from_file.log_format) == ("info", "json")
    assert (from_flags.log_level, from_flags.log_format) == ("info", "json")


def test_the_readme_example_is_a_config_file_of_every_start_flag(tmp_path: Path) -> None:
    example = README.read_text().split("```toml\n# node.toml\n", 1)[1].split("```", 1)[0]
    path = _write(tmp_path / "node.toml", example)
    values = read_flag_file(path, START)
    assert set(tomllib.loads(example)) == set(file_keys(START))
    assert values["data_dir"] == Path.home() / ".p2p-node"  # ~ expanded
    assert values["model_memory_mb"] == 2048.0 and values["mdns"] is False


def test_a_flag_on_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "node.toml",
        'workers = 4\nlisten = ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]\n'
        'mdns = true\nnetwork = "lab"\nlog-level = "error"\nlog-format = "json"\n',
    )
    args = parse_args(
        [
            *("--log-level", "debug", "start", "--config", str(path), "--workers", "2"),
            *("--listen", "/ip4/127.0.0.1/tcp/3", "--log-format", "text"),
        ]
    )
    assert args.workers == 2
    assert args.listen == ["/ip4/127.0.0.1/tcp/3"]  # replaced, not added to
    assert args.log_level == "debug" and args.log_format == "text"
    assert args.mdns is True and args.network == "lab"  # from the file
    assert parse_args(["start"]).workers == 2  # the default, when neither says


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("colour = 1\n", "unknown key 'colour'"),
        (
            "model_memory_mb = 5\n",
            "unknown key 'model_memory_mb' (did you mean 'model-memory-mb'?)",
        ),
        ("config = 'other.toml'\n", "unknown key 'config'"),
        ("[gossip]\ninterval = 1\n", "unknown key 'gossip'"),
        ('workers = "4"\n', "workers: expected an integer, got '4'"),
        ("workers = 2.5\n", "workers: expected an integer, got 2.5"),
        ("workers = 0\n", "workers: must be >= 1, got 0"),
        ("workers = true\n", "workers: expected an integer, got True"),
        ("interval = -1.0\n", "interval: must be > 0, got -1"),
        ("model-memory-mb = inf\n", "model-memory-mb: expected a finite number"),
        ("max-request-bytes = 100\n", "max-request-bytes: must be >= 1024, got 100"),
        ('mdns = "yes"\n', "mdns: expected true or false, got 'yes'"),
        ('listen = "/ip4/127.0.0.1/tcp/0"\n', "listen: expected a list"),
        ('listen = ["/ip4/1.2.3.4/tcpx/1"]\n', "listen: '/ip4/1.2.3.4/tcpx/1' is not a multiaddr"),
        ('bootstrap = ["/ip4/1.2.3.4/tcp/1"]\n', "bootstrap: '/ip4/1.2.3.4/tcp/1' does not end in"),
        ('allow-client = ["alice"]\n', "allow-client: 'alice' is not a peer id"),
        ('network = "a/b"\n', "network: network name must be 1-64 characters"),
        ("data-dir = 5\n", "data-dir: expected a string, got 5"),
        ('log-format = "xml"\n', "log-format: expected one of text, json, got 'xml'"),
        ('metrics-listen = "9100"\n', "metrics-listen: '9100' is not HOST:PORT"),
        ("metrics-listen = 9100\n", "metrics-listen: expected a string, got 9100"),
        ("workers = \n", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_stops_the_node_in_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    path = _write(tmp_path / "node.toml", text)
    code = main(["start", "--config", str(path), "--data-dir", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"p2p-node start: config file {path}")
    assert says in err
    assert not (tmp_path / "data").exists()  # stopped before the node began


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FlagFileError, match=r"cannot read config file .*none\.toml"):
        parse_args(["start", "--config", str(tmp_path / "none.toml")])


# --- flags on the command line ----------------------------------------------------------


SUBMIT = ["submit", "--peer", "/ip4/127.0.0.1/tcp/1/p2p/" + ALICE, "--input", "rows.npy"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([*SUBMIT, "--task", "t", "--outputs", "label"], "--outputs goes with --model"),
        ([*SUBMIT, "--model", "m", "--outputs", " , "], "--outputs needs at least one output"),
        ([*SUBMIT, "--model", "m", "--selection", "hybrid"], "--selection and --context go with"),
        ([*SUBMIT, "--model", "m", "--context", "a=1"], "--selection and --context go with"),
        ([*SUBMIT, "--model", "m", "--output", "o.npz"], "--output goes with --batch-size"),
        ([*SUBMIT, "--model", "m", "--via-node"], "--via-node goes with --batch-size"),
        ([*SUBMIT, "--task", "t", "--batch-size", "5"], "--batch-size goes with --model"),
        ([*SUBMIT, "--model", "m", "--batch-size", "5"], "--batch-size needs --output FILE.npy"),
        (
            [*SUBMIT, "--model", "m", "--batch-size", "5", "--output", "o.csv"],
            "--batch-size needs --output FILE.npy or FILE.npz",
        ),
        (["keygen"], "say what to write: --psk FILE, --identity FILE, or both"),
        (["start", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["start", "--bootstrap", "/ip4/1.2.3.4/tcp/1"], "argument --bootstrap: '/ip4/1.2"),
        (["start", "--allow-client", "alice"], "argument --allow-client: 'alice' is not a peer"),
    ],
)
def test_flags_that_do_not_go_together_print_the_usage_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err.startswith(f"usage: p2p-node {argv[0]} ")
    assert f"p2p-node {argv[0]}: error: {says}" in err


def test_flags_that_go_together_are_taken(tmp_path: Path) -> None:
    batch = parse_args([*SUBMIT, "--model", "m", "--batch-size", "5", "--output", "o.npz"])
    assert batch.batch_size == 5 and batch.output == Path("o.npz")
    task = parse_args([*SUBMIT, "--task", "t", "--selection", "hybrid", "--context", "a=1"])
    assert task.selection == "hybrid" and task.context == ["a=1"]
    keygen = parse_args(["keygen", "--psk", str(tmp_path / "k")])
    assert keygen.psk == tmp_path / "k"


# --- logs ------------------------------------------------------------------------------


def _json_lines(log: logging.Logger) -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return stream


def test_a_json_log_line_holds_the_record_and_the_fields_passed_with_it() -> None:
    log = logging.getLogger("p2p_node.test_json_log")
    stream = _json_lines(log)
    before = datetime.now(UTC)
    log.info("job %s: failing over", "j-1", extra={"job_id": "j-1", "peer": "12D3KooWpeer"})
    log.debug("shape %s", (2, 3), extra={"shape": (2, 3), "path": Path("/x")})
    after = datetime.now(UTC)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "time": first["time"],
        "level": "info",
        "logger": "p2p_node.test_json_log",
        "message": "job j-1: failing over",
        "job_id": "j-1",
        "peer": "12D3KooWpeer",
    }
    assert first["time"].endswith("Z")  # UTC, ISO 8601, to the millisecond
    moment = datetime.fromisoformat(first["time"])
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= moment <= after
    # What JSON cannot hold as it is is written as text; a tuple is a list.
    assert second["shape"] == [2, 3] and second["path"] == "/x"
    assert second["level"] == "debug"


def test_an_exception_is_a_field_of_its_json_log_line() -> None:
    log = logging.getLogger("p2p_node.test_json_exception")
    stream = _json_lines(log)
    try:
        raise ValueError("bad chunk")
    except ValueError:
        log.exception("batch failed", extra={"job_id": "j-2"})
    (line,) = stream.getvalue().splitlines()  # the traceback stays inside the one line
    record = json.loads(line)
    assert record["message"] == "batch failed" and record["level"] == "error"
    assert record["job_id"] == "j-2"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("ValueError: bad chunk")


def test_logs_are_text_unless_json_is_asked_for() -> None:
    assert parse_args(["start"]).log_format == "text"
    assert parse_args(["--log-format", "json", "peers", "--peer", "x"]).log_format == "json"
    assert parse_args(["peers", "--peer", "x", "--log-format", "json"]).log_format == "json"


# --- a reader that goes away ----------------------------------------------------------------


def test_a_command_whose_reader_is_gone_exits_quietly(tmp_path: Path) -> None:
    reading, writing = os.pipe()
    os.close(reading)  # the reader is gone before the command prints a thing
    try:
        done = subprocess.run(
            [*CLI, "keygen", "--psk", str(tmp_path / "swarm.key")],
            stdout=writing,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writing)
    assert (tmp_path / "swarm.key").exists()  # it ran
    assert done.stderr == ""  # no traceback, no "Exception ignored"
    assert done.returncode == BROKEN_PIPE_EXIT == 141
