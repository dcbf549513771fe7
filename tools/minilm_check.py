"""Checking the MiniLM graphs: the sentences, tokenizing, cosines to the reference, speed.

The check sentences come from Python's own documentation (``pydoc_data.topics``,
about 465k characters of English prose, code and grammar), so they ship with
every Python and need no download.
"""

from __future__ import annotations

import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

OUTPUT = "sentence_embedding"
SPEED_BATCH = 32
SPEED_ROUNDS = 7


def pydoc_sentences() -> list[str]:
    """English prose sentences from Python's documentation, in topic order.

    Paragraphs whose lines all start at column 0 with a letter are prose (code,
    grammar and lists are indented); they are split at sentence ends, and
    sentences of 6 to 40 words ending in a full stop are kept, once each.
    """
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            lines = paragraph.strip("\n").split("\n")
            if not all(line[:1].isalpha() for line in lines):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(lines)):
                if 6 <= len(sentence.split()) <= 40 and sentence.endswith("."):
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))  # a few sentences recur across topics


def check_and_calibration_sentences(n: int) -> tuple[list[str], list[str]]:
    """`n` sentences to check with, spread evenly over the documentation, and `n`
    others (the midpoints between them) to calibrate the int8 graph on."""
    sentences = pydoc_sentences()
    if len(sentences) < 2 * n:
        raise RuntimeError(f"pydoc_data.topics gave {len(sentences)} sentences, need {2 * n}")
    step = len(sentences) / n
    check = [sentences[int(i * step)] for i in range(n)]
    calibration = [sentences[int((i + 0.5) * step)] for i in range(n)]
    return check, calibration


def batch_tokenizer(tokenizer_path: Path, max_tokens: int) -> Tokenizer:
    """The shipped tokenizer padding to the longest text and truncating at `max_tokens`.

    tokenizer.json itself pads to a fixed 128 and truncates there, so both are
    set here rather than taken from the file.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")  # to the longest
    return tokenizer


def feeds(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    batches = [texts[i : i + SPEED_BATCH] for i in range(0, len(texts), SPEED_BATCH)]
    return np.concatenate([sess.run([OUTPUT], feeds(tokenizer, b))[0] for b in batches])


def cosines(got: np.ndarray, reference: np.ndarray) -> np.ndarray:
    got64 = got.astype(np.float64)
    return np.sum(got64 * reference, axis=1) / np.linalg.norm(got64, axis=1)


def sentences_per_second(
    sessions: dict[str, ort.InferenceSession], tokenizer: Tokenizer, texts: list[str]
) -> dict[str, float]:
    """Throughput of each session on `texts` in batches of SPEED_BATCH, tokenized
    beforehand. Each batch is run by every session in turn, SPEED_ROUNDS times, and
    its fastest time counts: on a shared machine, a burst of load then hits all the
    graphs alike and no single run decides."""
    batches = [
        feeds(tokenizer, texts[i : i + SPEED_BATCH]) for i in range(0, len(texts), SPEED_BATCH)
    ]
    for sess in sessions.values():
        sess.run([OUTPUT], batches[0])  # warm-up
    best = {name: [math.inf] * len(batches) for name in sessions}
    for _ in range(SPEED_ROUNDS):
        for k, feed in enumerate(batches):
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run([OUTPUT], feed)
                best[name][k] = min(best[name][k], time.perf_counter() - start)
    return {name: len(texts) / sum(times) for name, times in best.items()}


def single_latency_us(sess: ort.InferenceSession, tokenizer: Tokenizer, text: str) -> float:
    one = feeds(tokenizer, [text])
    runs: list[float] = []
    for _ in range(200):
        start = time.perf_counter_ns()
        sess.run([OUTPUT], one)
        runs.append((time.perf_counter_ns() - start) / 1000)
    return statistics.median(runs[20:])


def require(name: str, cos: np.ndarray, minimum: float, texts: list[str]) -> None:
    """Fail unless every text's cosine is at least `minimum`; name the worst text."""
    worst = int(np.argmin(cos))
    if cos[worst] < minimum:
        raise RuntimeError(f"{name}: cosine {cos[worst]:.6f} < {minimum} on {texts[worst]!r}")


def long_texts(sentences: list[str], count: int, words: int) -> list[str]:
    """`count` texts of at least `words` words, each sentences run together from a
    different start: over the token limit, they check truncation."""
    texts = []
    for start in range(0, len(sentences), len(sentences) // count)[:count]:
        run: list[str] = []
        for sentence in sentences[start:] + sentences[:start]:
            if sum(len(s.split()) for s in run) >= words:
                break
            run.append(sentence)
        texts.append(" ".join(run))
    return texts


_MEMORY_PROBE = """
import sys, numpy as np, onnxruntime as ort, psutil
process = psutil.Process()
before = process.memory_info().rss
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
for batch, length in ((1, 16), (32, 256)):
    ids = np.full((batch, length), 1000, np.int64)
    session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                       "token_type_ids": np.zeros_like(ids)})
    print((process.memory_info().rss - before) / 2**20)
"""


def memory_mb(path: Path) -> tuple[float, float]:
    """The resident memory a fresh process gains by loading the model and running one
    short text, then after a batch of 32 texts of 256 tokens (onnxruntime's arena keeps
    what the largest batch needed)."""
    probe = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)], check=True, capture_output=True, text=True
    )
    loaded, batch = (float(line) for line in probe.stdout.split())
    return loaded, batch
