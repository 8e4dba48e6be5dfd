"""A map that keeps its most recently used values within a byte budget: the stores' local caches and ledgers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Least recently used first; past `budget_bytes` the oldest go, but never the newest value (a value
    larger than the budget is kept alone rather than not at all)."""

    def __init__(self, budget_bytes: int, size: Callable[[V], int]) -> None:
        self.budget_bytes = budget_bytes
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Keep `value` as the most recently used (replacing any under `key`); returns what was evicted."""
        self.pop(key)
        self._items[key] = value
        self.nbytes += self._size(value)
        evicted = []
        while self.nbytes > self.budget_bytes and len(self._items) > 1:
            evicted.append(self._items.popitem(last=False))
            self.nbytes -= self._size(evicted[-1][1])
        return evicted

    def pop(self, key: K) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.nbytes -= self._size(value)
        return value
