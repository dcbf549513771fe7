"""Build the bundled ONNX model family shipped in ``p2p_node/bundled_models``.

Trains small scikit-learn classifiers on datasets that ship inside
scikit-learn (no downloads), converts them to ONNX with skl2onnx, checks
that onnxruntime agrees with scikit-learn on a held-out split, measures
held-out accuracy and single-row latency through onnxruntime, and writes,
for each model::

    <out>/<model_id>/model.onnx
    <out>/<model_id>/model.toml

plus the held-out labelled data used for selection benchmarks::

    <out>/heldout/digits.npz
    <out>/heldout/cancer.npz     (arrays ``x`` float32, ``y`` int64)

Training is deterministic (fixed seeds); the measured ``latency_us`` and
``cost`` depend on the machine the script runs on.

Requires the ``build`` extra (scikit-learn, skl2onnx) plus onnxruntime.
Run: ``python tools/build_models.py [--out DIR]``.

``python tools/build_models.py minilm [...]`` builds the sentence-embedding
model ``minilm-l6-v2`` instead (``tools/minilm.py``; ``minilm --help``).
The text generators are
built by ``tools/gpt.py`` (torch); ``--only classifiers`` or ``--only generators``
builds one family.

``python tools/build_models.py stages`` writes the 2- and 3-stage splits of the
generators and MiniLM into ``p2p_node/bundled_stages`` (``tools/bundled_stages.py``,
which runs without the ``build`` extra); a run that builds the generators ends
with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import bundled_stages
import minilm
import numpy as np
import onnxruntime as ort
import sklearn
from onnx.helper import make_opsetid
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC

SEED = 0
HELDOUT_FRACTION = 0.3
VERSION = "1.0.0"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
MIN_AGREEMENT = 0.99
MIN_TOP2_GAP = 1e-4  # see check_no_near_ties()
MAX_ONNX_BYTES = 3 * 1024 * 1024
LATENCY_WARMUP = 50
LATENCY_REPEATS = 300
LATENCY_ROUNDS = 5
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "p2p_node" / "bundled_models"


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset with a fixed stratified train/held-out split."""

    name: str  # short name, used for heldout/<name>.npz
    loader: str  # dotted path recorded in model.toml
    task_type: str
    subtypes: tuple[str, ...]
    x_train: np.ndarray
    x_heldout: np.ndarray
    y_train: np.ndarray
    y_heldout: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


@dataclass(frozen=True)
class ModelSpec:
    """One model of the family: how to build it and how to describe it."""

    model_id: str
    dataset: str
    make: Callable[[Dataset], BaseEstimator]  # returns a *fitted* estimator
    summary: str  # description prefix; accuracy is appended


@dataclass(frozen=True)
class BuiltModel:
    """Measured results for one converted model."""

    spec: ModelSpec
    data: Dataset
    onnx_bytes: bytes
    session: ort.InferenceSession
    accuracy: float
    latency_us: float = float("nan")  # filled in by measure_latencies()


# --------------------------------------------------------------------------- data


def split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Stratified, seeded train/held-out split; features as float32, labels int64."""
    x_tr, x_ho, y_tr, y_ho = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=HELDOUT_FRACTION,
        stratify=y,
        random_state=SEED,
    )
    return x_tr, x_ho, y_tr, y_ho


def load_datasets() -> dict[str, Dataset]:
    """Load the bundled scikit-learn datasets with their fixed splits."""
    digits_x, digits_y = load_digits(return_X_y=True)
    cancer_x, cancer_y = load_breast_cancer(return_X_y=True)
    return {
        "digits": Dataset(
            "digits",
            "sklearn.datasets.load_digits",
            "image-classification",
            ("digits",),
            *split(digits_x, digits_y),
        ),
        "cancer": Dataset(
            "cancer",
            "sklearn.datasets.load_breast_cancer",
            "tabular-classification",
            ("binary", "medical"),
            *split(cancer_x, cancer_y),
        ),
    }


# ------------------------------------------------------------------------- models


def pixel_scaler(n_features: int) -> MinMaxScaler:
    """A fitted scaler mapping raw digit pixels 0..16 to 0..1 (exactly x / 16).

    Fitted on the fixed range rather than the training data so the ONNX graph
    divides every pixel by 16 regardless of which values the split contains.
    """
    bounds = np.array([[0.0] * n_features, [16.0] * n_features], dtype=np.float32)
    return MinMaxScaler().fit(bounds)


def digits_pipeline(classifier: BaseEstimator, data: Dataset) -> Pipeline:
    """Fit ``classifier`` on x/16 and return a fitted [pixel scaler, classifier] pipeline."""
    scaler = pixel_scaler(data.n_features)
    classifier.fit(scaler.transform(data.x_train), data.y_train)
    return Pipeline([("scale", scaler), ("clf", classifier)])


def scaled_pipeline(classifier: BaseEstimator, data: Dataset) -> Pipeline:
    """Fit a [StandardScaler, classifier] pipeline on the training split."""
    pipeline = Pipeline([("scale", StandardScaler()), ("clf", classifier)])
    return pipeline.fit(data.x_train, data.y_train)


def fit_plain(classifier: BaseEstimator, data: Dataset) -> BaseEstimator:
    """Fit a classifier that needs no feature scaling."""
    return classifier.fit(data.x_train, data.y_train)


def rbf_svm() -> CalibratedClassifierCV:
    """RBF SVM with probability outputs.

    ``SVC(probability=True)`` is deprecated since scikit-learn 1.9; this is the
    documented replacement (Platt-style sigmoid calibration of one SVC).
    """
    return CalibratedClassifierCV(SVC(kernel="rbf", C=10.0, gamma="scale"), ensemble=False)


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "digits-logreg",
        "digits",
        lambda d: digits_pipeline(LogisticRegression(max_iter=2000, random_state=SEED), d),
        "Multinomial logistic regression on 8x8 handwritten digits",
    ),
    ModelSpec(
        "digits-mlp",
        "digits",
        lambda d: digits_pipeline(
            MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=1000, random_state=SEED), d
        ),
        "Multi-layer perceptron (64-32) on 8x8 handwritten digits",
    ),
    ModelSpec(
        "digits-forest",
        "digits",
        lambda d: digits_pipeline(
            RandomForestClassifier(n_estimators=61, max_depth=12, random_state=SEED), d
        ),
        "Random forest (61 trees, depth <= 12) on 8x8 handwritten digits",
    ),
    ModelSpec(
        "digits-svm",
        "digits",
        lambda d: digits_pipeline(rbf_svm(), d),
        "RBF-kernel SVM with sigmoid-calibrated probabilities on 8x8 handwritten digits",
    ),
    ModelSpec(
        "cancer-logreg",
        "cancer",
        lambda d: scaled_pipeline(LogisticRegression(max_iter=2000, random_state=SEED), d),
        "Standardised logistic regression on the Wisconsin breast-cancer features",
    ),
    ModelSpec(
        "cancer-forest",
        "cancer",
        lambda d: fit_plain(
            RandomForestClassifier(n_estimators=101, max_depth=8, random_state=SEED), d
        ),
        "Random forest (101 trees, depth <= 8) on the Wisconsin breast-cancer features",
    ),
    ModelSpec(
        "cancer-mlp",
        "cancer",
        lambda d: scaled_pipeline(
            MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=2000, random_state=SEED), d
        ),
        "Standardised multi-layer perceptron (32-16) on the Wisconsin breast-cancer features",
    ),
)


# ------------------------------------------------------------------ onnx + checks


def convert(model: BaseEstimator, n_features: int) -> bytes:
    """Convert a fitted classifier/pipeline to ONNX: input ``input`` float32 [None, n]."""
    with warnings.catch_warnings():
        # skl2onnx's SVC converter reads SVC.probA_/probB_, deprecated in sklearn 1.9.
        warnings.filterwarnings("ignore", message=r"Attribute `prob[AB]_` was deprecated")
        onx = to_onnx(
            model,
            initial_types=[("input", FloatTensorType([None, n_features]))],
            options={id(final_estimator(model)): {"zipmap": False}},
            target_opset=TARGET_OPSET,
        )
    # skl2onnx emits opset_import in set order (varies with PYTHONHASHSEED); sort
    # it so the same inputs always give byte-identical files.
    opsets = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    onx.opset_import.extend(make_opsetid(domain, version) for domain, version in opsets)
    serialized: bytes = onx.SerializeToString()
    return serialized


def final_estimator(model: BaseEstimator) -> BaseEstimator:
    """The classifier at the end of a pipeline (or the model itself)."""
    return model.steps[-1][1] if isinstance(model, Pipeline) else model


def make_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def check_signature(session: ort.InferenceSession, n_features: int, n_classes: int) -> None:
    """Fail unless the graph has the agreed input/output names, types and shapes."""
    inputs = session.get_inputs()
    outputs = {o.name: o for o in session.get_outputs()}
    if len(inputs) != 1 or inputs[0].name != "input" or inputs[0].type != "tensor(float)":
        raise RuntimeError(f"unexpected ONNX inputs: {[(i.name, i.type) for i in inputs]}")
    if inputs[0].shape[1] != n_features:
        raise RuntimeError(f"unexpected input shape {inputs[0].shape}")
    if set(outputs) != {"label", "probabilities"}:
        raise RuntimeError(f"unexpected ONNX outputs: {sorted(outputs)}")
    if outputs["label"].type != "tensor(int64)":
        raise RuntimeError(f"label output has type {outputs['label'].type}")
    probs = outputs["probabilities"]
    if probs.type != "tensor(float)" or probs.shape[1] != n_classes:
        raise RuntimeError(f"probabilities output is {probs.type} {probs.shape}")


def run_onnx(session: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels, probabilities) from the ONNX model."""
    labels, probs = session.run(["label", "probabilities"], {"input": x})
    return labels, probs


def check_agreement(model_id: str, sk_labels: np.ndarray, onnx_labels: np.ndarray) -> None:
    """Fail loudly if onnxruntime and scikit-learn disagree on too many rows."""
    agreement = float(np.mean(sk_labels == onnx_labels))
    if agreement < MIN_AGREEMENT:
        raise RuntimeError(
            f"{model_id}: ONNX/sklearn label agreement {agreement:.4f} < {MIN_AGREEMENT}"
        )


def check_no_near_ties(model_id: str, probs: np.ndarray) -> None:
    """Fail if a held-out row's two best classes are (almost) tied.

    A near-tie (e.g. a 50/50 tree vote) lets the predicted label, and so the
    recorded accuracy, depend on float summation order, which onnxruntime
    varies with its thread count. Change the model (e.g. an odd tree count).
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    gap = float(np.min(top2[:, 1] - top2[:, 0]))
    if gap < MIN_TOP2_GAP:
        raise RuntimeError(f"{model_id}: held-out top-2 probability gap {gap:.2e} is a near-tie")


def batch_of_one_timer(b: BuiltModel) -> Callable[[], float]:
    """A callable that times one batch-of-one run (cycling held-out rows), in ns."""
    rows = [b.data.x_heldout[i : i + 1] for i in range(len(b.data.x_heldout))]
    counter = iter(range(1 << 62))

    def timed_run() -> float:
        row = rows[next(counter) % len(rows)]
        start = time.perf_counter_ns()
        run_onnx(b.session, row)
        return time.perf_counter_ns() - start

    return timed_run


def measure_latencies(built: list[BuiltModel]) -> list[BuiltModel]:
    """Fill in each model's batch-of-one latency in microseconds.

    Models are measured round-robin, LATENCY_REPEATS calls each per round, for
    LATENCY_ROUNDS rounds; a model's latency is its lowest round median. The
    interleaving exposes all models to the same machine conditions, which keeps
    the relative costs steadier on a shared machine.
    """
    timers = [batch_of_one_timer(b) for b in built]
    for timer in timers:
        for _ in range(LATENCY_WARMUP):
            timer()
    best = [float("inf")] * len(built)
    for _ in range(LATENCY_ROUNDS):
        for k, timer in enumerate(timers):
            round_median = statistics.median(timer() for _ in range(LATENCY_REPEATS))
            best[k] = min(best[k], round_median)
    return [replace(b, latency_us=ns / 1000.0) for b, ns in zip(built, best, strict=True)]


def build_model(spec: ModelSpec, data: Dataset) -> BuiltModel:
    """Train, convert and verify one model; measure its held-out accuracy."""
    model = spec.make(data)
    onnx_bytes = convert(model, data.n_features)
    if len(onnx_bytes) > MAX_ONNX_BYTES:
        raise RuntimeError(f"{spec.model_id}: model.onnx is {len(onnx_bytes)} bytes")
    session = make_session(onnx_bytes)
    n_classes = len(np.unique(data.y_train))
    check_signature(session, data.n_features, n_classes)
    labels, probs = run_onnx(session, data.x_heldout)
    if labels.dtype != np.int64 or probs.dtype != np.float32 or probs.shape[1] != n_classes:
        raise RuntimeError(f"{spec.model_id}: bad output arrays {labels.dtype} {probs.shape}")
    check_agreement(spec.model_id, model.predict(data.x_heldout), labels)
    check_no_near_ties(spec.model_id, probs)
    accuracy = float(np.mean(labels == data.y_heldout))
    return BuiltModel(spec, data, onnx_bytes, session, accuracy)


# ------------------------------------------------------------------------ writing


def relative_costs(built: list[BuiltModel]) -> dict[str, float]:
    """Latency divided by the cheapest model's latency of the same task type."""
    fastest: dict[str, float] = {}
    for b in built:
        task = b.data.task_type
        fastest[task] = min(fastest.get(task, b.latency_us), b.latency_us)
    return {b.spec.model_id: round(b.latency_us / fastest[b.data.task_type], 2) for b in built}


def toml_str(value: str) -> str:
    """A TOML basic string (the values written here are plain ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_str_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(toml_str(v) for v in values) + "]"


def model_toml(b: BuiltModel, cost: float) -> str:
    """Render model.toml for one built model."""
    description = f"{b.spec.summary}; {100 * b.accuracy:.1f}% held-out accuracy."
    lines = [
        f"id = {toml_str(b.spec.model_id)}",
        f"version = {toml_str(VERSION)}",
        f"task_type = {toml_str(b.data.task_type)}",
        f"subtypes = {toml_str_list(b.data.subtypes)}",
        "languages = []",
        f"max_input_length = {b.data.n_features}",
        f"accuracy = {b.accuracy:.4f}",
        f"cost = {cost:.2f}",
        f"latency_us = {b.latency_us:.1f}",
        f"description = {toml_str(description)}",
        "[training]",
        f"dataset = {toml_str(b.data.loader)}",
        f"train_rows = {len(b.data.y_train)}",
        f"heldout_rows = {len(b.data.y_heldout)}",
        f"seed = {SEED}",
        f"sklearn_version = {toml_str(sklearn.__version__)}",
    ]
    return "\n".join(lines) + "\n"


def write_model(out: Path, b: BuiltModel, cost: float) -> None:
    """Write model.onnx and model.toml, then read the TOML back as a check."""
    model_dir = out / b.spec.model_id
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(b.onnx_bytes)
    text = model_toml(b, cost)
    parsed = tomllib.loads(text)
    if parsed["id"] != b.spec.model_id or parsed["training"]["seed"] != SEED:
        raise RuntimeError(f"{b.spec.model_id}: model.toml does not round-trip")
    (model_dir / "model.toml").write_text(text, encoding="utf-8")


def write_heldout(out: Path, data: Dataset) -> None:
    """Write the held-out split as heldout/<name>.npz with arrays x and y."""
    heldout_dir = out / "heldout"
    heldout_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        heldout_dir / f"{data.name}.npz",
        x=data.x_heldout.astype(np.float32),
        y=data.y_heldout.astype(np.int64),
    )


def report(built: list[BuiltModel], costs: dict[str, float]) -> str:
    """Fixed-width summary table of the built models."""
    header = (
        f"{'model':<15}{'task type':<25}{'accuracy':>9}"
        f"{'latency_us':>12}{'cost':>7}{'onnx KiB':>10}"
    )
    rows = [header, "-" * len(header)]
    for b in built:
        rows.append(
            f"{b.spec.model_id:<15}{b.data.task_type:<25}{b.accuracy:>9.4f}"
            f"{b.latency_us:>12.1f}{costs[b.spec.model_id]:>7.2f}{len(b.onnx_bytes) / 1024:>10.1f}"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--only",
        choices=("classifiers", "generators"),
        help="build one family (default: all; the text generators train for minutes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["minilm"]:
        minilm.main(argv[1:])
        return
    if argv[:1] == ["stages"]:
        bundled_stages.main(argv[1:])
        return
    args = parse_args(argv)
    if args.only in (None, "classifiers"):
        build_classifiers(args.out)
    if args.only in (None, "generators"):
        import gpt  # tools/gpt.py, beside this file: it needs torch

        gpt.build_generators(args.out)
        bundled_stages.build_stages(models=args.out)  # the splits follow the models they split


def build_classifiers(out: Path) -> None:
    datasets = load_datasets()
    built = measure_latencies([build_model(spec, datasets[spec.dataset]) for spec in MODEL_SPECS])
    costs = relative_costs(built)
    for b in built:
        write_model(out, b, costs[b.spec.model_id])
    for data in datasets.values():
        write_heldout(out, data)
    print(report(built, costs))


if __name__ == "__main__":
    main()
