"""Anchors and segment KVs in Redis, shared by every worker of a deployment.

Layout (prefix `kvmesh` by default):
  {p}:pool:{slot}    sorted set of anchor ids, scored by creation time (oldest first)
  {p}:uses:{slot}    hash anchor id -> times used (for eviction)
  {p}:anchor:{id}    the anchor's tensors (msgpack, see Anchor.to_bytes); immutable once written
  {p}:all            sorted set "{slot}\\x00{id}" by creation time, with {p}:size (hash) for the byte budget
  {p}:segment:{id}   a segment's token ids and base KV, expiring after `segment_ttl_s`
  {p}:origin         hash anchor id -> the store's `origin` that recorded it (when stores are named)
  {p}:used_by:{o}    hash origin -> anchors of that origin the store named `o` used (cross-worker sharing)
Anchors never change after they are written, so each worker keeps the ones it fetched in a local
cache and asks Redis only for the (small) list of ids per slot. Segments do not change either (an id names
its text, and a text's base KV is always the same), so the segments a worker wrote or read stay in a local
LRU too: a 2K-token prompt's segments are ~100 MB, a quarter second to fetch and decode. Eviction runs
under a short per-slot lock so that concurrent workers do not evict twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import msgpack
import redis

from .anchor import Anchor
from .kv_cache import KVCache
from .store import PoolConfig, StoredSegment, StoreUnavailable

log = logging.getLogger(__name__)
_LOCK_MS = 5000
T = TypeVar("T")


class RedisStore:
    def __init__(
        self,
        url: str,
        config: PoolConfig | None = None,
        *,
        prefix: str = "kvmesh",
        segment_ttl_s: int = 3600,
        local_cache_bytes: int = 1 << 30,
        local_segment_bytes: int = 512 << 20,
        origin: str | None = None,
    ) -> None:
        """origin: this store's user (a worker's name): anchors it records are tagged with it, and the anchors
        it uses are counted by their origin, so a deployment can see one worker reuse another's anchors."""
        self.config = config or PoolConfig()
        self.url = url
        self.origin = origin
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._p = prefix
        self._segment_ttl_ms = segment_ttl_s * 1000
        self._cache: OrderedDict[str, Anchor] = OrderedDict()
        self._cache_bytes = 0
        self._local_cache_bytes = local_cache_bytes
        self._segments: OrderedDict[str, StoredSegment] = OrderedDict()
        self._segments_bytes = 0
        self._local_segment_bytes = local_segment_bytes

    def ping(self) -> None:
        self._call(self._redis.ping)

    # -- anchors -----------------------------------------------------------------------------------
    def anchors(self, slot: str) -> list[Anchor]:
        ids = [i.decode() for i in self._call(self._redis.zrange, f"{self._p}:pool:{slot}", 0, -1)]
        missing = [i for i in ids if i not in self._cache]
        if missing:
            blobs = self._call(self._redis.mget, [f"{self._p}:anchor:{i}" for i in missing])
            for blob in blobs:
                if blob is not None:  # evicted between the two calls: skip it
                    self._remember(Anchor.from_bytes(blob))
        found = []
        for anchor_id in ids:
            if anchor_id in self._cache:
                self._cache.move_to_end(anchor_id)
                found.append(self._cache[anchor_id])
        return found

    def add_anchor(self, slot: str, anchor: Anchor) -> None:
        size = anchor.nbytes()
        pipe = self._redis.pipeline()
        pipe.set(f"{self._p}:anchor:{anchor.anchor_id}", anchor.to_bytes())
        pipe.zadd(f"{self._p}:pool:{slot}", {anchor.anchor_id: anchor.created})
        pipe.hset(f"{self._p}:uses:{slot}", anchor.anchor_id, 0)
        pipe.zadd(f"{self._p}:all", {f"{slot}\x00{anchor.anchor_id}": anchor.created})
        pipe.hset(f"{self._p}:size", f"{slot}\x00{anchor.anchor_id}", size)
        if self.origin is not None:
            pipe.hset(f"{self._p}:origin", anchor.anchor_id, self.origin)
        self._call(pipe.execute)
        self._remember(anchor)
        self._evict(slot, keep=anchor.anchor_id)

    def mark_used(self, slot: str, anchor_ids: list[str]) -> None:
        origins = self._call(self._redis.hmget, f"{self._p}:origin", anchor_ids) if self.origin and anchor_ids else []
        pipe = self._redis.pipeline()
        for anchor_id in anchor_ids:
            pipe.hincrby(f"{self._p}:uses:{slot}", anchor_id, 1)
        for origin in origins:
            who = origin.decode() if origin is not None else "unknown"
            pipe.hincrby(f"{self._p}:used_by:{self.origin}", who, 1)
        self._call(pipe.execute)

    def used_by(self, user: str) -> dict[str, int]:
        """Anchors the store named `user` has used, counted by the origin that recorded them."""
        raw = self._call(self._redis.hgetall, f"{self._p}:used_by:{user}")
        return {key.decode(): int(value) for key, value in raw.items()}

    def uses(self, slot: str) -> dict[str, int]:
        raw = self._call(self._redis.hgetall, f"{self._p}:uses:{slot}")
        return {key.decode(): int(value) for key, value in raw.items()}

    @property
    def anchor_bytes(self) -> int:
        return sum(int(v) for v in self._call(self._redis.hvals, f"{self._p}:size"))

    def _evict(self, slot: str, keep: str) -> None:
        lock = f"{self._p}:lock:{slot}"
        if not self._call(self._redis.set, lock, "1", nx=True, px=_LOCK_MS):
            return  # another worker is evicting this slot right now
        try:
            while self._call(self._redis.zcard, f"{self._p}:pool:{slot}") > self.config.max_anchors:
                self._evict_least_used(slot, keep)
            while self.anchor_bytes > self.config.budget_bytes:
                oldest = [m.decode() for m in self._call(self._redis.zrange, f"{self._p}:all", 0, 0)]
                if not oldest or oldest[0].endswith(f"\x00{keep}"):
                    break
                self._evict_least_used(oldest[0].split("\x00", 1)[0], keep)
        finally:
            self._call(self._redis.delete, lock)

    def _evict_least_used(self, slot: str, keep: str) -> None:
        window = self.config.window + 1  # one extra in case `keep` is among the oldest
        oldest = [i.decode() for i in self._call(self._redis.zrange, f"{self._p}:pool:{slot}", 0, window - 1)]
        oldest = [i for i in oldest if i != keep][: self.config.window]
        if not oldest:
            return
        uses = self._call(self._redis.hmget, f"{self._p}:uses:{slot}", oldest)
        counts = [int(u) if u is not None else 0 for u in uses]
        victim = oldest[counts.index(min(counts))]  # index() takes the oldest on ties
        pipe = self._redis.pipeline()
        pipe.zrem(f"{self._p}:pool:{slot}", victim)
        pipe.hdel(f"{self._p}:uses:{slot}", victim)
        pipe.delete(f"{self._p}:anchor:{victim}")
        pipe.zrem(f"{self._p}:all", f"{slot}\x00{victim}")
        pipe.hdel(f"{self._p}:size", f"{slot}\x00{victim}")
        pipe.hdel(f"{self._p}:origin", victim)
        self._call(pipe.execute)

    def _remember(self, anchor: Anchor) -> None:
        if anchor.anchor_id in self._cache:
            return
        self._cache[anchor.anchor_id] = anchor
        self._cache_bytes += anchor.nbytes()
        while self._cache_bytes > self._local_cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= dropped.nbytes()

    # -- segments ----------------------------------------------------------------------------------
    def get_segment(self, segment_id: str) -> StoredSegment | None:
        local = self._segments.get(segment_id)
        if local is not None:
            self._segments.move_to_end(segment_id)
            return local
        blob = self._call(self._redis.get, f"{self._p}:segment:{segment_id}")
        if blob is None:
            return None
        record = msgpack.unpackb(blob)
        segment = StoredSegment(record["token_ids"], KVCache.from_bytes(record["kv"]))
        self._keep_segment(segment_id, segment)
        return segment

    def put_segment(self, segment_id: str, segment: StoredSegment) -> None:
        blob = msgpack.packb({"token_ids": segment.token_ids, "kv": segment.kv.to_bytes()})
        self._call(self._redis.set, f"{self._p}:segment:{segment_id}", blob, px=self._segment_ttl_ms)
        self._keep_segment(segment_id, segment)

    def _keep_segment(self, segment_id: str, segment: StoredSegment) -> None:
        old = self._segments.pop(segment_id, None)
        if old is not None:
            self._segments_bytes -= old.kv.nbytes()
        self._segments[segment_id] = segment
        self._segments_bytes += segment.kv.nbytes()
        while self._segments_bytes > self._local_segment_bytes and len(self._segments) > 1:
            _, dropped = self._segments.popitem(last=False)
            self._segments_bytes -= dropped.kv.nbytes()

    def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable ({exc})") from exc
