"""The memory budget for loaded models, on the real bundled models with tiny budgets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from gossip import ViewSnapshot
from p2p_node import ConfigError, ErrorCode, ExecutorConfig, JobError, NodeConfig
from p2p_node._executor import Executor
from p2p_node._repository import ModelCard, bundled_models_dir, read_repository
from p2p_node.testing import open_swarm
from scheduler import DistributionStrategy

MB = 1 << 20
DIGITS = ("digits-logreg", "digits-mlp", "digits-svm")


def cards(*ids: str) -> dict[str, ModelCard]:
    return {c.id: c for c in read_repository(bundled_models_dir(), frozenset(ids))}


def size(model_id: str) -> int:
    return (bundled_models_dir() / model_id / "model.onnx").stat().st_size


def budget_mb(*model_ids: str, slack: int = 1024) -> float:
    """Room for exactly these models (plus `slack` bytes), in MB."""
    return (sum(size(m) for m in model_ids) + slack) / MB


def digits_executor(budget: float) -> Executor:
    """Serves digits-logreg (4 KiB), digits-mlp (28 KiB) and digits-svm (209 KiB)."""
    config = ExecutorConfig(model_memory_mb=budget, inline_below_ms=0)
    return Executor.from_cards(list(cards(*DIGITS).values()), config)


def rows(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"input": x[:2]}


def test_a_models_memory_is_its_file_size_unless_its_card_says() -> None:
    svm = cards("digits-svm")["digits-svm"]
    assert svm.memory_bytes == size("digits-svm")
    assert replace(svm, memory_mb=12.5).memory_bytes == 12.5 * MB


def test_at_start_models_load_in_order_while_they_fit() -> None:
    ex = digits_executor(budget_mb("digits-svm", "digits-mlp"))  # not all three
    assert ex.models.loaded == {"digits-logreg", "digits-mlp"}
    assert [d.id for d in ex.descriptors] == list(DIGITS)  # all served, specs known
    assert ex.models.used_bytes == size("digits-logreg") + size("digits-mlp")


def test_a_model_bigger_than_the_whole_budget_is_refused_at_start() -> None:
    with pytest.raises(ConfigError) as caught:
        digits_executor(budget_mb("digits-svm", slack=-1))
    message = str(caught.value)
    assert "digits-svm" in message and "model_memory_mb" in message
    assert f"{budget_mb('digits-svm', slack=-1):g} MB" in message


async def test_loading_off_the_event_loop_serves_what_from_cards_serves() -> None:
    config = ExecutorConfig(model_memory_mb=budget_mb("digits-svm", "digits-mlp"))
    with trio.fail_after(30):
        ex = await Executor.load(list(cards(*DIGITS).values()), config)
        with pytest.raises(ConfigError, match="digits-svm"):
            await Executor.load(
                [cards("digits-svm")["digits-svm"]], replace(config, model_memory_mb=0.1)
            )
    assert ex.models.loaded == {"digits-logreg", "digits-mlp"}
    assert ex.descriptors == Executor.from_cards(list(cards(*DIGITS).values()), config).descriptors


def test_no_budget_keeps_every_model_loaded() -> None:
    ex = Executor.from_cards(list(cards(*DIGITS).values()), ExecutorConfig())
    assert ex.models.loaded == set(DIGITS)


async def test_a_model_on_disk_loads_on_demand_unloading_the_least_recently_used(digits) -> None:
    x, _ = digits
    ex = digits_executor(budget_mb("digits-svm", "digits-mlp"))
    assert ex.models.loaded == {"digits-logreg", "digits-mlp"}
    with trio.fail_after(20):
        await ex.run("digits-mlp", rows(x))
        await ex.run("digits-logreg", rows(x))  # mlp is now the least recently used
        svm = await ex.run("digits-svm", rows(x))
        assert ex.models.loaded == {"digits-logreg", "digits-svm"}
        assert ex.models.lru_order() == ["digits-logreg", "digits-svm"]
        await ex.run("digits-mlp", rows(x))  # logreg goes: svm was used after it
        assert ex.models.loaded == {"digits-svm", "digits-mlp"}
    assert (ex.models.loads, ex.models.unloads) == (2, 2)
    assert ex.models.used_bytes <= budget_mb("digits-svm", "digits-mlp") * MB
    assert svm.outputs["label"].shape == (2,)


async def test_concurrent_requests_for_a_model_on_disk_load_it_once(digits) -> None:
    x, _ = digits
    ex = digits_executor(budget_mb("digits-svm", "digits-mlp"))
    results = []

    async def run_svm() -> None:
        results.append(await ex.run("digits-svm", rows(x)))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(run_svm)
    assert len(results) == 4
    assert ex.models.loads == 1
    assert "digits-svm" in ex.models.loaded


async def test_models_in_use_are_never_unloaded_and_a_full_budget_is_overloaded(digits) -> None:
    x, _ = digits
    ex = digits_executor(budget_mb("digits-svm"))  # svm alone fills the budget
    assert ex.models.loaded == {"digits-logreg", "digits-mlp"}
    with trio.fail_after(20):
        async with ex.models.use("digits-mlp"):  # a run in progress holds mlp
            with pytest.raises(JobError) as caught:
                await ex.run("digits-svm", rows(x))
            assert "digits-mlp" in ex.models.loaded  # nothing unloaded for nothing
        await ex.run("digits-svm", rows(x))  # mlp is free again: it goes
    assert caught.value.code == ErrorCode.OVERLOADED and caught.value.retryable
    assert "model_memory_mb" in caught.value.message and "digits-mlp" in caught.value.message
    assert ex.models.loaded == {"digits-svm"}


async def test_the_record_says_loaded_or_on_disk_and_model_specific_prefers_loaded(
    tmp_path: Path, digits
) -> None:
    """Node 1 serves mlp and svm with room for mlp only; node 2 serves svm alone."""
    x, _ = digits
    base = NodeConfig(
        data_dir=tmp_path,
        shutdown_grace=1.0,
        target_degree=0,
        executor=ExecutorConfig(model_memory_mb=budget_mb("digits-svm", slack=4096)),
    )
    shares = [frozenset({"cancer-logreg"}), frozenset(DIGITS[1:]), frozenset({"digits-svm"})]
    with trio.fail_after(60):
        async with open_swarm(3, models=shares, base=base) as swarm:
            await swarm.wait_converged()
            a, b, c = swarm.nodes
            assert _loaded(a.view.snapshot(), b.peer_id) == {
                "digits-mlp": True,
                "digits-svm": False,
            }
            placement = a.orchestrator.placement("digits-svm", DistributionStrategy.MODEL_SPECIFIC)
            assert [p.peer_id for p in placement.candidates] == [c.peer_id, b.peer_id]
            assert "loaded in memory" in placement.candidates[0].reason
            assert "on disk" in placement.candidates[1].reason

            await b.executor.run("digits-svm", rows(x))  # b unloads mlp to load svm
            await a.view.wait_until(
                lambda view: _loaded(view, b.peer_id) == {"digits-mlp": False, "digits-svm": True}
            )


def _loaded(view: ViewSnapshot, peer_id: str) -> dict[str, bool]:
    record = view.peers[peer_id].record
    return {m.descriptor.id: m.loaded for m in record.models}
