"""Reading things from disk: the model repository, config files, and the node identity."""

from __future__ import annotations

import collections
import hashlib
import os
import stat
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from p2p_node._config import (
    ConfigError,
    ExecutorConfig,
    GossipConfig,
    NodeConfig,
    load_bootstrap_file,
)
from p2p_node._identity import (
    IDENTITY_FILE,
    IdentityError,
    load_or_create_identity,
    lock_data_dir,
)
from p2p_node._repository import (
    RepositoryError,
    TextSpec,
    bundled_models_dir,
    read_model_card,
    read_repository,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A real peer id, derived from a fixed seed so the tests do not depend on randomness.
PEER_ID = ID.from_pubkey(Ed25519PrivateKey.from_bytes(bytes(range(32))).get_public_key())
PEER_ADDR = f"/ip4/192.0.2.10/tcp/4001/p2p/{PEER_ID.to_base58()}"

# --- the model repository --------------------------------------------------------------

_CARD = {
    "version": '"1.0.0"',
    "task_type": '"tabular-classification"',
    "max_input_length": "30",
    "accuracy": "0.95",
    "cost": "2",
    "subtypes": '["cancer"]',
    "languages": "[]",
    "description": '"a test model"',
    "latency_us": "12.5",
}


def _toml(model_id: str, **changes: str | None) -> str:
    fields = {"id": f'"{model_id}"', **_CARD, **changes}
    lines = [f"{k} = {v}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def _write_model(
    root: Path, model_id: str, toml: str | None = None, onnx: bytes | None = b"onnx bytes"
) -> Path:
    model_dir = root / model_id
    model_dir.mkdir(parents=True)
    (model_dir / "model.toml").write_text(_toml(model_id) if toml is None else toml)
    if onnx is not None:
        (model_dir / "model.onnx").write_bytes(onnx)
    return model_dir


def test_a_model_card_reads_every_field(tmp_path: Path) -> None:
    model_dir = _write_model(tmp_path, "cancer-x", onnx=b"\x08\x07" * 1000)
    card = read_model_card(model_dir)
    assert card.id == "cancer-x"
    assert card.version == "1.0.0"
    assert card.task_type == "tabular-classification"
    assert card.subtypes == ("cancer",)
    assert card.languages == ()
    assert card.max_input_length == 30
    assert (card.accuracy, card.cost) == (0.95, 2.0)
    assert type(card.cost) is float
    assert card.description == "a test model"
    assert card.onnx_path == model_dir / "model.onnx"
    assert card.sha256 == hashlib.sha256(b"\x08\x07" * 1000).hexdigest()


def test_optional_fields_have_defaults(tmp_path: Path) -> None:
    toml = _toml("m", subtypes=None, languages=None, description=None, latency_us=None)
    card = read_model_card(_write_model(tmp_path, "m", toml))
    assert (card.subtypes, card.languages, card.description) == ((), (), "")


def test_the_training_table_is_allowed(tmp_path: Path) -> None:
    toml = _toml("m") + '[training]\ndataset = "iris"\nseed = 0\n'
    assert read_model_card(_write_model(tmp_path, "m", toml)).id == "m"


_BAD_CARDS = {
    "not-toml": ("id = = 1\n", "is not valid TOML"),
    "missing-id": (_toml("m", id=None), "missing fields ['id']"),
    "missing-accuracy-and-cost": (
        _toml("m", accuracy=None, cost=None),
        "missing fields ['accuracy', 'cost']",
    ),
    "unknown-field": (_toml("m") + 'colour = "red"\n', "unknown fields ['colour']"),
    "id-int": (_toml("m", id="1"), "id has the wrong type int"),
    "version-float": (_toml("m", version="1.0"), "version has the wrong type float"),
    "task_type-list": (_toml("m", task_type='["a"]'), "task_type has the wrong type list"),
    "max_input_length-str": (_toml("m", max_input_length='"64"'), "max_input_length"),
    "max_input_length-float": (_toml("m", max_input_length="64.0"), "max_input_length"),
    "accuracy-str": (_toml("m", accuracy='"high"'), "accuracy has the wrong type str"),
    "cost-list": (_toml("m", cost="[1]"), "cost has the wrong type list"),
    "subtypes-str": (_toml("m", subtypes='"digits"'), "subtypes has the wrong type str"),
    "subtypes-of-ints": (_toml("m", subtypes="[1, 2]"), "subtypes must be a list of strings"),
    "languages-of-tables": (_toml("m", languages="[{a = 1}]"), "languages must be a list"),
    "description-int": (_toml("m", description="5"), "description has the wrong type int"),
    "latency-str": (_toml("m", latency_us='"fast"'), "latency_us has the wrong type str"),
    "training-not-table": (_toml("m") + "training = 3\n", "training has the wrong type int"),
    "id-not-the-dir-name": (_toml("other"), "id 'other' must match its directory name 'm'"),
}


@pytest.mark.parametrize(("toml", "says"), _BAD_CARDS.values(), ids=_BAD_CARDS.keys())
def test_a_bad_model_card_is_refused_naming_the_file(tmp_path: Path, toml: str, says: str) -> None:
    model_dir = _write_model(tmp_path, "m", toml)
    with pytest.raises(RepositoryError) as caught:
        read_model_card(model_dir)
    assert str(model_dir / "model.toml") in str(caught.value)
    assert says in str(caught.value)


_TEXT = {
    "tokenizer": '"tokenizer.json"',
    "max_tokens": "256",
    "truncation": "true",
    "postprocess": '"mean_pool_normalize"',
    "inputs": '{ input_ids = "input_ids", mask = "attention_mask" }',
}


def _text_toml(model_id: str = "m", **changes: str | None) -> str:
    fields = {**_TEXT, **changes}
    return (
        _toml(model_id)
        + "[text]\n"
        + "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)
    )


def _write_text_model(root: Path, toml: str) -> Path:
    model_dir = _write_model(root, "m", toml)
    (model_dir / "tokenizer.json").write_text("{}")
    return model_dir


def test_a_text_table_is_read_into_a_text_spec(tmp_path: Path) -> None:
    model_dir = _write_text_model(tmp_path, _text_toml())
    assert read_model_card(model_dir).text == TextSpec(
        tokenizer_path=model_dir / "tokenizer.json",
        max_tokens=256,
        truncation=True,
        inputs=(("input_ids", "input_ids"), ("mask", "attention_mask")),
        postprocess="mean_pool_normalize",
    )


def test_truncation_is_off_unless_the_text_table_says(tmp_path: Path) -> None:
    model_dir = _write_text_model(tmp_path, _text_toml(truncation=None))
    text = read_model_card(model_dir).text
    assert text is not None and text.truncation is False


def test_a_model_without_a_text_table_takes_tensors(tmp_path: Path) -> None:
    assert read_model_card(_write_model(tmp_path, "m")).text is None


_BAD_TEXT = {
    "not-a-table": (_toml("m") + "text = 3\n", "text has the wrong type int"),
    "missing-tokenizer": (_text_toml(tokenizer=None), "lacks fields ['tokenizer']"),
    "unknown-field": (_text_toml(vocab='"v.txt"'), "has unknown fields ['vocab']"),
    "max-tokens-str": (_text_toml(max_tokens='"256"'), "max_tokens must be a positive integer"),
    "max-tokens-bool": (_text_toml(max_tokens="true"), "max_tokens must be a positive integer"),
    "max-tokens-zero": (_text_toml(max_tokens="0"), "max_tokens must be a positive integer, got 0"),
    "truncation-str": (_text_toml(truncation='"yes"'), "truncation must be true or false"),
    "inputs-list": (
        _text_toml(inputs='["input_ids"]'),
        "inputs must give each graph input one of the tokenizer outputs",
    ),
    "inputs-of-ints": (_text_toml(inputs="{ input_ids = 1 }"), "got {'input_ids': 1}"),
    "unknown-feature": (
        _text_toml(inputs='{ input_ids = "input_ids", x = "pixels" }'),
        "'x': 'pixels'",
    ),
    "no-input-ids": (
        _text_toml(inputs='{ mask = "attention_mask" }'),
        "input_ids among them",
    ),
    "a-feature-twice": (
        _text_toml(inputs='{ a = "input_ids", b = "input_ids" }'),
        "feed a tokenizer output twice",
    ),
    "unknown-postprocess": (_text_toml(postprocess='"cls_pool"'), "got 'cls_pool'"),
    "tokenizer-missing": (
        _text_toml(tokenizer='"vocab.json"'),
        "tokenizer 'vocab.json' is missing",
    ),
    "tokenizer-outside": (
        _text_toml(tokenizer='"../m/tokenizer.json"'),
        "tokenizer must be a file name in the model's directory",
    ),
}


@pytest.mark.parametrize(("toml", "says"), _BAD_TEXT.values(), ids=_BAD_TEXT.keys())
def test_a_bad_text_table_is_refused_naming_the_file(tmp_path: Path, toml: str, says: str) -> None:
    model_dir = _write_text_model(tmp_path, toml)
    with pytest.raises(RepositoryError) as caught:
        read_model_card(model_dir)
    assert str(model_dir / "model.toml") in str(caught.value)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "toml",
    [_toml("m", max_input_length="true"), _toml("m", accuracy="false")],
    ids=["max_input_length-bool", "accuracy-bool"],
)
def test_a_boolean_number_field_is_refused(tmp_path: Path, toml: str) -> None:
    with pytest.raises(RepositoryError):
        read_model_card(_write_model(tmp_path, "m", toml))


def test_a_model_card_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    model_dir = _write_model(tmp_path, "m")
    (model_dir / "model.toml").write_bytes(_toml("m").encode() + b'extra = "\xff"\n')
    with pytest.raises(RepositoryError):
        read_model_card(model_dir)


def test_a_card_without_its_onnx_file_is_refused(tmp_path: Path) -> None:
    model_dir = _write_model(tmp_path, "m", onnx=None)
    with pytest.raises(RepositoryError, match=r"has model\.toml but no model\.onnx"):
        read_model_card(model_dir)


def test_a_repository_lists_models_sorted_by_id(tmp_path: Path) -> None:
    for model_id in ("zeta", "alpha", "mid"):
        _write_model(tmp_path, model_id, onnx=model_id.encode())
    (tmp_path / "heldout").mkdir()  # data, not a model: no model.toml
    (tmp_path / "README.md").write_text("not a model")

    cards = read_repository(tmp_path)

    assert [c.id for c in cards] == ["alpha", "mid", "zeta"]
    assert [c.sha256 for c in cards] == [
        hashlib.sha256(name.encode()).hexdigest() for name in ("alpha", "mid", "zeta")
    ]


def test_only_selects_models(tmp_path: Path) -> None:
    for model_id in ("a", "b", "c"):
        _write_model(tmp_path, model_id)
    assert [c.id for c in read_repository(tmp_path, only=frozenset({"c", "a"}))] == ["a", "c"]


def test_only_skips_broken_models_it_does_not_name(tmp_path: Path) -> None:
    _write_model(tmp_path, "good")
    _write_model(tmp_path, "broken", "not toml at all [")
    assert [c.id for c in read_repository(tmp_path, only=frozenset({"good"}))] == ["good"]


_BAD_REPOSITORIES = {
    "only-names-a-missing-model": (frozenset({"a", "nope"}), "has no models ['nope']"),
    "only-names-a-dir-without-card": (frozenset({"empty"}), "has no models ['empty']"),
}


@pytest.mark.parametrize(("only", "says"), _BAD_REPOSITORIES.values(), ids=_BAD_REPOSITORIES)
def test_only_must_name_models_that_are_there(
    tmp_path: Path, only: frozenset[str], says: str
) -> None:
    _write_model(tmp_path, "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match=f"{tmp_path}.*{says}".replace("[", r"\[")):
        read_repository(tmp_path, only=only)


@pytest.mark.parametrize("kind", ["missing", "a-file"])
def test_the_repository_must_be_a_directory(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "models"
    if kind == "a-file":
        root.write_text("")
    with pytest.raises(RepositoryError, match=f"model directory {root} does not exist"):
        read_repository(root)


def test_a_broken_model_fails_the_whole_repository(tmp_path: Path) -> None:
    _write_model(tmp_path, "good")
    _write_model(tmp_path, "bad", _toml("bad", cost='"free"'))
    with pytest.raises(RepositoryError, match="cost has the wrong type"):
        read_repository(tmp_path)


def test_the_bundled_repository() -> None:
    root = bundled_models_dir()
    cards = read_repository(root)

    assert len(cards) == 10
    assert collections.Counter(c.task_type for c in cards) == {
        "image-classification": 4,
        "tabular-classification": 3,
        "sentence-embedding": 1,
        "text-generation": 2,
    }
    assert [c.id for c in cards] == sorted(c.id for c in cards)
    for card in cards:
        assert card.onnx_path.parent == root / card.id
        assert card.sha256 == hashlib.sha256(card.onnx_path.read_bytes()).hexdigest()
        assert 0.0 <= card.accuracy <= 1.0
        assert (card.text is not None) == (
            card.task_type in ("sentence-embedding", "text-generation")
        )


def test_the_bundled_embedding_model_takes_text() -> None:
    (card,) = read_repository(bundled_models_dir(), frozenset({"minilm-l6-v2"}))
    assert card.languages == ("en",)
    assert card.text == TextSpec(
        tokenizer_path=card.onnx_path.parent / "tokenizer.json",
        max_tokens=256,
        truncation=True,
        inputs=(
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
            ("token_type_ids", "token_type_ids"),
        ),
        postprocess="mean_pool_normalize",
    )
    assert card.max_input_length == card.text.max_tokens


# --- the bootstrap file ----------------------------------------------------------------


def test_the_repository_bootstrap_file_is_empty() -> None:
    assert load_bootstrap_file(REPO_ROOT / "bootstrap_peers.toml") == ()


_GOOD_BOOTSTRAP = {
    "one-peer": (f'peers = ["{PEER_ADDR}"]\n', (PEER_ADDR,)),
    "two-peers-in-order": (
        f'peers = [\n  "{PEER_ADDR}",\n  "/dns4/example.com/tcp/1/p2p/{PEER_ID.to_base58()}",\n]\n',
        (PEER_ADDR, f"/dns4/example.com/tcp/1/p2p/{PEER_ID.to_base58()}"),
    ),
    "empty-list": ("peers = []\n", ()),
    "empty-file": ("", ()),
    "only-comments": ("# nobody yet\n", ()),
}


@pytest.mark.parametrize(("text", "peers"), _GOOD_BOOTSTRAP.values(), ids=_GOOD_BOOTSTRAP.keys())
def test_a_valid_bootstrap_file_parses(tmp_path: Path, text: str, peers: tuple[str, ...]) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(text)
    assert load_bootstrap_file(path) == peers


_BAD_BOOTSTRAP = {
    "not-toml": ("peers = [", "is not valid TOML"),
    "unknown-key": (f'peers = ["{PEER_ADDR}"]\nseeds = []\n', "unknown keys ['seeds']"),
    "peers-a-string": (f'peers = "{PEER_ADDR}"\n', "`peers` must be a list"),
    "peers-a-table": ("[peers]\na = 1\n", "`peers` must be a list"),
    "peers-of-ints": ("peers = [1]\n", "`peers` must be a list of multiaddr strings"),
    "no-peer-id": ('peers = ["/ip4/192.0.2.10/tcp/4001"]\n', "does not end in /p2p/<peer id>"),
    "not-a-multiaddr": ('peers = ["192.0.2.10:4001"]\n', "is not a multiaddr"),
    "bad-peer-id": ('peers = ["/ip4/192.0.2.10/tcp/4001/p2p/not-base58!"]\n', "is not a multiaddr"),
}


@pytest.mark.parametrize(("text", "says"), _BAD_BOOTSTRAP.values(), ids=_BAD_BOOTSTRAP.keys())
def test_a_bad_bootstrap_file_is_refused_naming_the_file(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "peers.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_bootstrap_file(path)
    assert f"bootstrap file {path}" in str(caught.value)
    assert says in str(caught.value)


def test_a_missing_bootstrap_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"cannot read bootstrap file {path}"):
        load_bootstrap_file(path)


def test_a_bootstrap_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peers.toml"
    path.write_bytes(b"# caf\xe9\npeers = []\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_bootstrap_file(path)


# --- NodeConfig and ExecutorConfig -----------------------------------------------------


def test_a_node_config_with_good_addresses(tmp_path: Path) -> None:
    config = NodeConfig(
        data_dir=tmp_path,
        listen=("/ip4/0.0.0.0/tcp/4001", "/ip6/::1/tcp/0"),
        bootstrap=(PEER_ADDR,),
    )
    assert config.bootstrap == (PEER_ADDR,)


_BAD_NODE_CONFIGS = {
    "no-listen-address": ({"listen": ()}, "at least one listen address"),
    "listen-not-multiaddr": ({"listen": ("127.0.0.1:4001",)}, "is not a multiaddr"),
    "listen-unknown-protocol": ({"listen": ("/ip4/127.0.0.1/tcpx/1",)}, "is not a multiaddr"),
    "bootstrap-without-peer-id": (
        {"bootstrap": ("/ip4/192.0.2.10/tcp/4001",)},
        "does not end in /p2p/<peer id>",
    ),
    "bootstrap-not-multiaddr": ({"bootstrap": ("peer.example.com",)}, "is not a multiaddr"),
    "request-limit-tiny": ({"max_request_bytes": 1023}, "at least 1024 bytes"),
    "reply-limit-tiny": ({"max_reply_bytes": 0}, "at least 1024 bytes"),
    "control-limit-tiny": ({"max_control_request_bytes": 100}, "at least 1024 bytes"),
    "no-inbound-streams": ({"max_concurrent_inbound": 0}, "max_concurrent_inbound must be >= 1"),
}


@pytest.mark.parametrize(
    ("changes", "says"), _BAD_NODE_CONFIGS.values(), ids=_BAD_NODE_CONFIGS.keys()
)
def test_a_bad_node_config_is_refused(
    tmp_path: Path, changes: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        NodeConfig(data_dir=tmp_path, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["workers", "intra_op_threads", "queue_limit", "max_batch_rows"])
@pytest.mark.parametrize("value", [0, -1])
def test_executor_config_values_below_one_are_refused(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be >= 1, got {value}"):
        ExecutorConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), float("nan")])
def test_a_model_memory_budget_must_be_a_positive_number(budget: float) -> None:
    with pytest.raises(ConfigError, match="model_memory_mb must be a positive number"):
        ExecutorConfig(model_memory_mb=budget)


def test_a_refresh_shorter_than_the_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"refresh \(0.5 s\) must be at least the interval"):
        GossipConfig(interval=1.0, refresh=0.5)
    assert GossipConfig(interval=2.0, refresh=2.0).refresh == 2.0


def test_executor_config_accepts_one() -> None:
    config = ExecutorConfig(workers=1, intra_op_threads=1, queue_limit=1, use_gpu=False)
    assert (config.workers, config.intra_op_threads, config.queue_limit) == (1, 1, 1)


# --- identity and the data-dir lock ----------------------------------------------------


def _peer_id(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)


def test_an_identity_is_created_private_on_first_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    load_or_create_identity(data_dir)

    path = data_dir / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32


def test_the_identity_survives_a_restart(tmp_path: Path) -> None:
    created = load_or_create_identity(tmp_path)
    first = load_or_create_identity(tmp_path)
    second = load_or_create_identity(tmp_path)
    assert _peer_id(created) == _peer_id(first) == _peer_id(second)


def test_two_data_dirs_have_two_identities(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a")
    b = load_or_create_identity(tmp_path / "b")
    assert _peer_id(a) != _peer_id(b)


def test_an_existing_seed_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_bytes(bytes(range(32)))
    assert _peer_id(load_or_create_identity(tmp_path)) == PEER_ID


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_an_identity_file_of_the_wrong_length_is_refused(tmp_path: Path, length: int) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(b"\x01" * length)
    with pytest.raises(IdentityError, match=f"{path}.*found {length} bytes"):
        load_or_create_identity(tmp_path)
    assert path.read_bytes() == b"\x01" * length  # never overwritten


def test_a_data_dir_can_be_locked_only_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    fd = lock_data_dir(data_dir)
    try:
        with pytest.raises(IdentityError, match=f"data dir {data_dir} is in use"):
            lock_data_dir(data_dir)
    finally:
        os.close(fd)

    again = lock_data_dir(data_dir)
    os.close(again)


def test_locks_on_different_data_dirs_are_independent(tmp_path: Path) -> None:
    a = lock_data_dir(tmp_path / "a")
    try:
        b = lock_data_dir(tmp_path / "b")
        os.close(b)
    finally:
        os.close(a)
