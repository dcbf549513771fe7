"""Selection layer: model catalog and selection strategies (see issue: Selection)."""

__all__: list[str] = []
