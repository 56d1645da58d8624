"""One small registry type for every extension point (models, datasets, criteria, backends, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from deploycomp.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping filled by a decorator that refuses duplicates.

    Example:
        >>> CRITERIA = Registry("pruning criterion")
        >>> @CRITERIA.register("magnitude")
        ... class Magnitude: ...
    """

    def __init__(self, kind: str, hint: str = "", plural: str | None = None):
        self.kind = kind
        self.hint = hint
        self.plural = plural
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@reg.register(name)`` or ``reg.register(name, obj)``."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``, or raise a one-line error naming the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items, self.hint, self.plural) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
