"""Where anchors and segment KVs live: the contract, and the in-process implementation.

The Redis implementation (redis_store.py) shares pools across workers; this one serves a single
worker and the tests. Both follow the same eviction rule (per slot: at most `max_anchors`, and when
full the least-used of the `window` oldest goes; overall: a byte budget enforced the same way), the same
per-record cap, and check what they hold against the model's KV layout once a planner binds it.

A store never fails a call over a bad entry: one that does not verify or decode is dropped and reads as a
miss, and the store reports it (take_rejections) for the call to say so. It raises StoreError only when the
store itself fails (unreachable, or answering errors); callers then serve dense.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import msgpack
import torch

from .anchor import Anchor
from .byte_lru import ByteLRU
from .kv_cache import KVCache, KVLayout, unpack_map


class StoreError(RuntimeError):
    """The store failed a call (unreachable, or it answered an error); callers serve dense and say so."""


class StoreUnavailable(StoreError):
    """The store cannot be reached."""


@dataclass(frozen=True)
class PoolConfig:
    max_anchors: int = 8  # per slot
    window: int = 4  # eviction looks at this many of the oldest anchors and drops the least used
    budget_bytes: int = 2 << 30  # all anchors together
    segment_budget_bytes: int = 1 << 30  # segment KVs kept for reuse (Redis: those this store wrote, until they expire)
    record_max_bytes: int = 128 << 20  # one segment's KV or one anchor; a larger one is not stored

    def __post_init__(self) -> None:
        if self.max_anchors < 1 or self.window < 1:
            raise ValueError("PoolConfig.max_anchors and window must be >= 1")
        for name in ("budget_bytes", "segment_budget_bytes", "record_max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PoolConfig.{name} must be a positive number of bytes, got {getattr(self, name)}")

    def refuse(self, nbytes: int) -> str | None:
        """Why a record of `nbytes` is not stored, or None if it may be."""
        if nbytes <= self.record_max_bytes:
            return None
        cap = _size(self.record_max_bytes)
        return f"{_size(nbytes)}, over the per-record cap of {cap} (PoolConfig.record_max_bytes)"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:.1f} KiB"


@dataclass
class StoredSegment:
    """A segment's tokens and its base KV, keys normalized to start at position 0."""

    token_ids: list[int]
    kv: KVCache

    def check(self, layout: KVLayout) -> None:
        """Raise RecordInvalid unless the tokens are the model's and the KV is theirs."""
        layout.check_tokens(self.token_ids, "segment token ids")
        layout.check(self.kv, "segment KV", tokens=len(self.token_ids))

    def to_bytes(self) -> bytes:
        return msgpack.packb({"token_ids": self.token_ids, "kv": self.kv.to_bytes()})

    @classmethod
    def from_bytes(
        cls, data: bytes | memoryview, layout: KVLayout, device: torch.device | str = "cpu"
    ) -> StoredSegment:
        """Decode a to_bytes record as the model's KV (`layout`); RecordInvalid if it does not fit."""
        record = unpack_map(data, "segment record", ("token_ids", "kv"))
        token_ids = layout.check_tokens(record["token_ids"], "segment token ids")
        segment = cls(token_ids, KVCache.from_bytes(record["kv"], layout.dtype, device))
        segment.check(layout)
        return segment


@dataclass(frozen=True)
class Rejection:
    """A stored entry that failed to verify or decode: it was dropped and read as a miss."""

    kind: str  # "segment" or "anchor"
    key: str  # its id
    fault: str  # "tampered" (its HMAC does not verify) or "malformed" (it does not decode or fit the model)
    detail: str

    def line(self) -> str:
        """What a call that met it reports (ReuseStats.degradations)."""
        return f"dropped a {self.fault} {self.kind} {self.key} ({self.detail})"


class Store(Protocol):
    def bind_layout(self, layout: KVLayout) -> None: ...
    def anchors(self, slot: str) -> list[Anchor]: ...
    def add_anchor(self, slot: str, anchor: Anchor) -> None: ...
    def mark_used(self, slot: str, anchor_ids: list[str]) -> None: ...
    def get_segment(self, segment_id: str) -> StoredSegment | None: ...
    def put_segment(self, segment_id: str, segment: StoredSegment) -> str | None: ...  # None, or why not stored
    def take_rejections(self) -> list[Rejection]: ...  # the entries dropped since the last take


def bound_layout(current: KVLayout | None, layout: KVLayout) -> KVLayout:
    """A store holds one model's KV: binding it to another model's layout is a deployment error."""
    if current is not None and current != layout:
        raise ValueError(
            f"this KV store already holds KV of layout {current}; a model with {layout} needs a store of its "
            "own (another Redis key prefix, or another store)"
        )
    return layout


@dataclass
class _Entry:
    anchor: Anchor
    uses: int = 0


class MemoryStore:
    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self.layout: KVLayout | None = None
        self._pools: dict[str, OrderedDict[str, _Entry]] = {}
        self._segments: ByteLRU[str, StoredSegment] = ByteLRU(
            self.config.segment_budget_bytes, lambda segment: segment.kv.nbytes()
        )
        self._anchor_bytes = 0

    def bind_layout(self, layout: KVLayout) -> None:
        """Check what is stored from now on against the model's KV layout (a wrong shape is a bug: raises)."""
        self.layout = bound_layout(self.layout, layout)

    def take_rejections(self) -> list[Rejection]:
        return []  # entries never leave this process as bytes: nothing to verify or decode

    # -- anchors -----------------------------------------------------------------------------------
    def anchors(self, slot: str) -> list[Anchor]:
        return [entry.anchor for entry in self._pools.get(slot, {}).values()]

    def uses(self, slot: str) -> dict[str, int]:
        return {anchor_id: entry.uses for anchor_id, entry in self._pools.get(slot, {}).items()}

    def add_anchor(self, slot: str, anchor: Anchor) -> None:
        if self.config.refuse(anchor.nbytes()):
            return  # not kept: calls of this slot stay dense rather than hold one huge anchor
        if self.layout is not None:
            anchor.check(self.layout)
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
        return self._segments.get(segment_id)

    def put_segment(self, segment_id: str, segment: StoredSegment) -> str | None:
        refused = self.config.refuse(segment.kv.nbytes())
        if refused is not None:
            return refused
        if self.layout is not None:
            segment.check(self.layout)
        if segment_id not in self._segments:
            self._segments.put(segment_id, segment)
        return None
