"""Nodes of one process share one onnxruntime session per model file (`_executor`),
and each still counts the model in its own memory budget."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import trio

from p2p_node import ExecutorConfig, bundled_models_dir
from p2p_node._executor import load_model
from p2p_node._repository import ModelCard, read_repository
from p2p_node.testing import open_swarm

MODEL = "digits-mlp"


def card() -> ModelCard:
    (found,) = read_repository(bundled_models_dir(), frozenset({MODEL}))
    return found


def test_a_session_is_shared_while_held_and_freed_when_no_one_holds_it() -> None:
    first = load_model(card(), ExecutorConfig())
    second = load_model(card(), ExecutorConfig())
    assert second.session is first.session
    assert second.descriptor == first.descriptor
    # Other settings, another session.
    other = load_model(card(), ExecutorConfig(intra_op_threads=2))
    assert other.session is not first.session
    held = weakref.ref(first.session)
    del first, second
    gc.collect()
    assert held() is None  # the process keeps no session no node holds
    again = load_model(card(), ExecutorConfig())
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    (ours,) = again.session.run(["label"], {"input": x})
    (theirs,) = other.session.run(["label"], {"input": x})
    assert np.array_equal(ours, theirs)


async def test_nodes_in_one_process_share_a_models_session_and_each_counts_it() -> None:
    with trio.fail_after(60):
        async with open_swarm(2, models=[frozenset({MODEL})] * 2) as swarm:
            a, b = (swarm[i].executor.models for i in range(2))
            held_a, held_b = a.hold(MODEL), b.hold(MODEL)
            assert held_a is not None and held_b is not None
            assert held_a.session is held_b.session
            a.release(MODEL)
            b.release(MODEL)
            assert a.used_bytes == b.used_bytes == card().memory_bytes > 0
            x = np.random.default_rng(1).random((8, 64), dtype=np.float32)
            runs = [await swarm[i].executor.run(MODEL, {"input": x}) for i in range(2)]
            assert np.array_equal(runs[0].outputs["label"], runs[1].outputs["label"])
