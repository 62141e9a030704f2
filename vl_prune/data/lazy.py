"""Sequences whose items are made only when asked for: a split's examples that are too many to
hold (UNITER's pre-training texts, a retrieval pool of every image-caption pair)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload


class LazySequence(Sequence):
    """A read-only sequence of `len(self)` items, item i made by `item(i)`; slices give lists
    and negative indices count from the end, as a list's do."""

    def item(self, index: int) -> Any:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.item(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.item(index)
