"""A coordinator answers each job id once.

A client that lost its coordinator mid-job, or its connection mid-reply, sends
the same job (same id) again; this node must not run it twice, and must give
the same answer. `JobOnce` keeps, per job id, the running job (a duplicate
waits for it) or its outcome (a duplicate gets it at once), bounded in count,
bytes and age. Retryable failures are not kept: trying again is the point.

A job's fingerprint (what tells a resent job from another that reuses its id)
is computed only when a second request with the same id comes, which almost
never happens: hashing every request cost a coordinator 12 us per small job
and 25 ms per 16 MiB one. Until then the entry holds the request, and its
inputs count towards the bytes bound.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import trio

from scheduler import ErrorCode, InferenceResult, JobError

from ._messages import RunRequest

DEFAULT_MAX_JOBS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TTL_S = 600.0

# A fingerprint, or how to compute it when it is needed.
Print: TypeAlias = bytes | Callable[[], bytes]


def fingerprint(request: RunRequest) -> bytes:
    """What makes two requests the same job: all but the id and the time left."""
    digest = hashlib.blake2b(digest_size=16)
    head = (
        request.model_id,
        request.task,
        request.selection,
        sorted(request.context.items()),
        request.strategy,
        request.requirements,
        request.hedge,
    )
    digest.update(repr(head).encode())
    for name in sorted(request.inputs):
        array = np.ascontiguousarray(request.inputs[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.view(np.uint8).data if array.size else b"")
    if request.texts:  # a text job: its texts and whether they may be cut
        digest.update(repr((request.texts, request.truncate)).encode())
    return digest.digest()


def request_bytes(request: RunRequest) -> int:
    """What a request's tensors hold, in bytes."""
    return _nbytes(request.inputs)


def _nbytes(tensors: Mapping[str, object]) -> int:
    """The bytes of `tensors`: an array's own count, without np.asarray's call (a
    generator and an asarray per tensor were 2 % of a node's CPU at c=32)."""
    total = 0
    for value in tensors.values():
        total += value.nbytes if type(value) is np.ndarray else int(np.asarray(value).nbytes)
    return total


@dataclass(slots=True)
class _Entry:
    print_: Print
    holds: int = 0  # bytes `print_` holds until it is computed (the request's inputs)
    outcome: InferenceResult | JobError | None = None  # None: abandoned, run it again
    finished_at: float = 0.0
    size: int = 0
    done: bool = False
    # Made by the first duplicate that waits (`wait`), which almost no job has: an
    # Event made and set for every job was a fifth of what JobOnce cost it.
    waiters: trio.Event | None = None

    def finish(self) -> None:
        self.done = True
        if self.waiters is not None:
            self.waiters.set()

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        if self.waiters is None:
            self.waiters = trio.Event()
        await self.waiters.wait()

    def fingerprint(self) -> bytes:
        if not isinstance(self.print_, bytes):
            self.print_, self.holds = self.print_(), 0
        return self.print_


def _computed(print_: Print) -> bytes:
    return print_ if isinstance(print_, bytes) else print_()


class JobOnce:
    def __init__(
        self,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._max_jobs = max_jobs
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._bytes = 0
        self.duplicates = 0  # requests answered without running again

    def __len__(self) -> int:
        return len(self._entries)

    async def run(
        self,
        sender: str,
        job_id: str,
        print_: Print,
        job: Callable[[], Awaitable[InferenceResult]],
        *,
        holds: int = 0,
    ) -> InferenceResult:
        """`job()`'s result, running it only if `sender` has no answer for `job_id` here
        yet. Ids are per sender: two clients may choose the same one.

        `print_` is the request's fingerprint, or a function that computes it when
        a second request with this id comes; `holds` is the bytes that function
        keeps alive meanwhile (counted towards the bytes bound)."""
        key = (sender, job_id)
        while True:
            self._expire(trio.current_time())
            entry = self._entries.get(key)
            if entry is None:
                break
            if entry.fingerprint() != _computed(print_):
                raise JobError(
                    ErrorCode.INVALID_INPUT,
                    f"job id {job_id!r} was already used for a different request; "
                    "job ids must be unique",
                )
            self.duplicates += 1
            await entry.wait()
            if entry.outcome is None:
                continue  # the first try was abandoned: run it (again)
            return _unwrap(entry.outcome)
        lazy = not isinstance(print_, bytes)
        entry = self._entries[key] = _Entry(print_, holds if lazy else 0)
        try:
            result = await job()
        except JobError as error:
            if error.retryable:
                self._forget(key, entry)
            else:
                self._keep(entry, error, 0)
            raise
        except BaseException:  # cancelled: the caller hung up, nobody has the answer
            self._forget(key, entry)
            raise
        self._keep(entry, result, _nbytes(result.outputs))
        return result

    def _keep(self, entry: _Entry, outcome: InferenceResult | JobError, size: int) -> None:
        entry.outcome, entry.size = outcome, size + entry.holds
        entry.finished_at = trio.current_time()
        self._bytes += entry.size
        entry.finish()
        while self._entries and (
            len(self._entries) > self._max_jobs or self._bytes > self._max_bytes
        ):
            oldest_id = next(iter(self._entries))
            oldest = self._entries[oldest_id]
            if not oldest.done:
                self._entries.move_to_end(oldest_id)  # running: evict finished ones first
                if all(not e.done for e in self._entries.values()):
                    break
                continue
            self._drop(oldest_id)

    def _forget(self, key: tuple[str, str], entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]
        entry.finish()

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest_id = next(iter(self._entries))
            oldest = self._entries[oldest_id]
            if not oldest.done or now - oldest.finished_at < self._ttl_s:
                return
            self._drop(oldest_id)


def _unwrap(outcome: InferenceResult | JobError) -> InferenceResult:
    if isinstance(outcome, JobError):
        raise JobError(outcome.code, outcome.message, peer=outcome.peer)
    return outcome
