"""One error vocabulary for every protocol. Numbers are stable and never reused."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    INTERNAL = 1
    MALFORMED_MESSAGE = 2
    UNSUPPORTED_VERSION = 3
    MESSAGE_TOO_LARGE = 4
    UNKNOWN_MODEL = 5
    INVALID_INPUT = 6
    OVERLOADED = 7
    DEADLINE_EXCEEDED = 8
    PEER_UNREACHABLE = 9
    NO_CAPABLE_PEER = 10
    SHUTTING_DOWN = 11
    UNAUTHORIZED = 12  # the node does not take this request from this peer
    UNKNOWN_TASK = 13  # no model of the asked task type anywhere in the view
    NO_FITTING_MODEL = 14  # models of the task exist, but none fits the request's context
    INVALID_SELECTION = 15  # bad strategy, weights or context values
    UNKNOWN_JOB = 16  # feedback for a job this node did not coordinate (or forgot)

    @property
    def retryable(self) -> bool:
        """Whether another attempt (maybe on another peer) can succeed.

        The orchestrator sends a request that failed with a retryable code to
        another peer, and backs the failed peer off, within the request's deadline;
        every code but OVERLOADED counts towards `OrchestratorConfig.max_attempts`.
        INTERNAL (a bug, or a model that failed to load, on that peer) is treated
        like any other retryable code: another peer may well succeed.
        """
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.INTERNAL,
        ErrorCode.OVERLOADED,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.PEER_UNREACHABLE,
        ErrorCode.SHUTTING_DOWN,
    }
)


class JobError(Exception):
    """A job or inference request failed. `peer` is where it failed, when known.

    `retry_after` (seconds), when set, is how long the peer asks the caller to
    wait before trying it again (an OVERLOADED rate limit, say).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        peer: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        where = f" (peer {peer})" if peer else ""
        super().__init__(f"{code.name}: {message}{where}")
        self.code = code
        self.message = message
        self.peer = peer
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.code.retryable
