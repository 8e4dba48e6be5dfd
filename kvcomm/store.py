"""Where anchors and segment KVs live: the contract, and the in-process implementation.

The Redis implementation (redis_store.py) shares pools across workers; this one serves a single
worker and the tests. Both follow the same eviction rule (per slot: at most `max_anchors`, and when
full the least-used of the `window` oldest goes; overall: a byte budget enforced the same way).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from .anchor import Anchor
from .kv_cache import KVCache


class StoreUnavailable(RuntimeError):
    """The store cannot be reached; callers fall back to dense prefill and say so."""


@dataclass(frozen=True)
class PoolConfig:
    max_anchors: int = 8  # per slot
    window: int = 4  # eviction looks at this many of the oldest anchors and drops the least used
    budget_bytes: int = 2 << 30  # all anchors together
    segment_budget_bytes: int = 1 << 30  # segment KVs kept for reuse

    def __post_init__(self) -> None:
        if self.max_anchors < 1 or self.window < 1:
            raise ValueError("max_anchors and window must be >= 1")
        if self.budget_bytes <= 0 or self.segment_budget_bytes <= 0:
            raise ValueError("byte budgets must be positive")


@dataclass
class StoredSegment:
    """A segment's tokens and its base KV, keys normalized to start at position 0."""

    token_ids: list[int]
    kv: KVCache


class Store(Protocol):
    def anchors(self, slot: str) -> list[Anchor]: ...
    def add_anchor(self, slot: str, anchor: Anchor) -> None: ...
    def mark_used(self, slot: str, anchor_ids: list[str]) -> None: ...
    def get_segment(self, segment_id: str) -> StoredSegment | None: ...
    def put_segment(self, segment_id: str, segment: StoredSegment) -> None: ...


@dataclass
class _Entry:
    anchor: Anchor
    uses: int = 0


class MemoryStore:
    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self._pools: dict[str, OrderedDict[str, _Entry]] = {}
        self._segments: OrderedDict[str, StoredSegment] = OrderedDict()
        self._anchor_bytes = 0
        self._segment_bytes = 0

    # -- anchors -----------------------------------------------------------------------------------
    def anchors(self, slot: str) -> list[Anchor]:
        return [entry.anchor for entry in self._pools.get(slot, {}).values()]

    def uses(self, slot: str) -> dict[str, int]:
        return {anchor_id: entry.uses for anchor_id, entry in self._pools.get(slot, {}).items()}

    def add_anchor(self, slot: str, anchor: Anchor) -> None:
        pool = self._pools.setdefault(slot, OrderedDict())
        while len(pool) >= self.config.max_anchors:
            self._evict_from(slot)
        pool[anchor.anchor_id] = _Entry(anchor)
        self._anchor_bytes += anchor.nbytes()
        while self._anchor_bytes > self.config.budget_bytes and self._evict_oldest_pool(keep=anchor.anchor_id):
            pass

    def mark_used(self, slot: str, anchor_ids: list[str]) -> None:
        pool = self._pools.get(slot, {})
        for anchor_id in anchor_ids:
            if anchor_id in pool:
                pool[anchor_id].uses += 1

    @property
    def anchor_bytes(self) -> int:
        return self._anchor_bytes

    def _evict_from(self, slot: str, keep: str | None = None) -> None:
        pool = self._pools[slot]
        oldest = [item for item in pool.items() if item[0] != keep][: self.config.window]
        victim = min(oldest, key=lambda item: item[1].uses)[0]  # min() takes the oldest on ties
        self._anchor_bytes -= pool.pop(victim).anchor.nbytes()

    def _evict_oldest_pool(self, keep: str) -> bool:
        """Under the byte budget: evict from the slot holding the globally oldest anchor (never `keep`)."""
        candidates = [
            (next(iter(pool.values())).anchor.created, slot)
            for slot, pool in self._pools.items()
            if pool and (len(pool) > 1 or keep not in pool)
        ]
        if not candidates:
            return False
        self._evict_from(min(candidates)[1], keep)
        return True

    # -- segments ----------------------------------------------------------------------------------
    def get_segment(self, segment_id: str) -> StoredSegment | None:
        segment = self._segments.get(segment_id)
        if segment is not None:
            self._segments.move_to_end(segment_id)
        return segment

    def put_segment(self, segment_id: str, segment: StoredSegment) -> None:
        if segment_id in self._segments:
            return
        self._segments[segment_id] = segment
        self._segment_bytes += segment.kv.nbytes()
        while self._segment_bytes > self.config.segment_budget_bytes and len(self._segments) > 1:
            _, dropped = self._segments.popitem(last=False)
            self._segment_bytes -= dropped.kv.nbytes()
