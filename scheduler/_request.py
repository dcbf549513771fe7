"""A request to run one model, and what comes back."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ._node_info import NO_REQUIREMENTS, Requirements

Tensors = Mapping[str, npt.NDArray[np.generic]]


def new_job_id() -> str:
    """128 random bits as 32 hex digits, a uuid4's form: uuid4().hex built a UUID
    object and its integer to get there, four times the time."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """Run `model_id` on `inputs` within `timeout` seconds.

    A text job carries `texts` instead (and no inputs): the node that runs it
    tokenizes them with the model's own tokenizer; `truncate` lets it cut a text
    longer than the model's window, even where the model does not truncate itself.
    """

    model_id: str
    inputs: Tensors
    timeout: float = 30.0
    job_id: str = field(default_factory=new_job_id)
    requirements: Requirements = NO_REQUIREMENTS
    outputs: tuple[str, ...] = ()  # the outputs wanted, by name; () for all of them
    texts: tuple[str, ...] = ()  # a text job's strings; () for a tensor job
    truncate: bool = False

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        # The checks of each name skipped when there are none (most requests): their
        # generators were 3% of a node's CPU at c=32 (one request built per job).
        if type(self.outputs) is not tuple or (
            self.outputs and not all(type(name) is str and name for name in self.outputs)
        ):
            raise ValueError(f"outputs must be a tuple of output names, got {self.outputs!r}")
        if self.outputs and len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs names one output twice: {self.outputs!r}")
        if type(self.texts) is not tuple or (
            self.texts and not all(type(t) is str for t in self.texts)
        ):
            raise ValueError(f"texts must be a tuple of strings, got {type(self.texts).__name__}")
        if self.texts and self.inputs:
            raise ValueError("a request carries texts or input tensors, not both")
        if self.truncate and not self.texts:
            raise ValueError("truncate goes with texts")


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """Outputs of one run and where the time went. `executor` is a peer id.

    `route` is set when a model was selected for a task: which model answered how
    many rows (a cascade lists every stage, cheapest first). `load` is how many
    requests (from anyone) the executor held when it answered, None if it did not
    say: what its coordinator places the next requests by. `labels` is a text
    classifier's answer by name, one per text; `texts` a text generator's greedy
    completion, one per prompt (the request's texts).
    """

    job_id: str
    model_id: str
    outputs: Tensors
    executor: str
    queue_ms: float
    compute_ms: float
    route: tuple[tuple[str, int], ...] = ()
    load: int | None = None
    labels: tuple[str, ...] = ()  # a text classifier's label per text; () otherwise
    texts: tuple[str, ...] = ()  # a text generator's completion per prompt; () otherwise
