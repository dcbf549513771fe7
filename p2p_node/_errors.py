"""Errors leave our context managers as themselves, not wrapped in exception groups."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_single_errors() -> Iterator[None]:
    """Re-raise a lone exception out of the (libp2p, trio) nurseries it passed through.

    trio wraps whatever crosses a nursery in an ExceptionGroup; a caller of
    `Client.connect` or `open_node` should be able to write `except JobError`.
    Groups of several real errors pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error
