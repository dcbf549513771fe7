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
        found = list(leaves(group))
        if len(found) == 1:
            raise found[0] from None
        raise


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The errors in `error` and in the groups nested in it; a lone error is its own."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error
