"""Anchors and segment KVs in Redis, shared by every worker of a deployment.

Layout (prefix `kvmesh` by default):
  {p}:pool:{slot}    sorted set of anchor ids, scored by creation time (oldest first)
  {p}:uses:{slot}    hash anchor id -> times used (for eviction)
  {p}:anchor:{id}    the anchor's tensors (msgpack, see Anchor.to_bytes), sealed; immutable once written
  {p}:all            sorted set "{slot}\\x00{id}" by creation time, with {p}:size (hash) for the byte budget
  {p}:segment:{id}   a segment's token ids and base KV (StoredSegment.to_bytes), sealed, expiring after
                     `segment_ttl_s`
  {p}:origin         hash anchor id -> the store's `origin` that recorded it (when stores are named)
  {p}:used_by:{o}    hash origin -> anchors of that origin the store named `o` used (cross-worker sharing)
Records are sealed (record_seal.py: an HMAC over the bytes and the key, an anchor's also over its slot) and
read back only if they verify and fit the model's KV layout; anything else is dropped (deleted, warned
about once per kind, counted in `rejected`) and reads as a miss. The counters and sets only steer eviction:
unreadable ones count as zero or are skipped.
Anchors never change after they are written, so each worker keeps the ones it fetched in a local
cache and asks Redis only for the (small) list of ids per slot. Segments do not change either (an id names
its text, and a text's base KV is always the same), so the segments a worker wrote or read stay in a local
LRU too: a 2K-token prompt's segments are ~100 MB, a quarter second to fetch and decode. The segments a
worker writes stay within PoolConfig.segment_budget_bytes (it deletes its oldest past that), besides the
server's own maxmemory. Eviction runs under a short per-slot lock so that concurrent workers do not evict twice.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from .anchor import Anchor
from .byte_lru import ByteLRU
from .kv_cache import KVLayout, RecordInvalid
from .record_seal import Sealer
from .store import PoolConfig, Rejection, StoredSegment, StoreError, StoreUnavailable, bound_layout

log = logging.getLogger(__name__)
_LOCK_MS = 5000
# RedisStore's secret when none is given: stores of this process read each other's records, others' fail to
# verify. Sessions pass theirs (RuntimeConfig.store_secret), shared by all their workers.
_PROCESS_SECRET = secrets.token_bytes(32)
T = TypeVar("T")


class RedisStore:
    def __init__(
        self,
        url: str,
        config: PoolConfig | None = None,
        *,
        secret: str | bytes | None = None,
        layout: KVLayout | None = None,
        prefix: str = "kvmesh",
        segment_ttl_s: int = 3600,
        local_cache_bytes: int = 1 << 30,
        local_segment_bytes: int = 512 << 20,
        origin: str | None = None,
    ) -> None:
        """secret: what records are sealed with (None: this process's own, see _PROCESS_SECRET). layout: the
        model's KV layout records must fit (a ReusePlanner binds its model's). origin: this store's user (a
        worker's name): anchors it records are tagged with it, and the anchors it uses are counted by their
        origin, so a deployment can see one worker reuse another's anchors."""
        self.config = config or PoolConfig()
        self.url = url
        self.origin = origin
        self.layout = layout
        self.rejected: Counter[tuple[str, str]] = Counter()  # (kind, fault) -> entries dropped
        self._rejections: list[Rejection] = []
        self._sealer = Sealer(secret if secret is not None else _PROCESS_SECRET)
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._p = prefix
        self._segment_ttl_s = segment_ttl_s
        # anchors by (slot, id): an id listed under another slot is fetched and verified for that slot
        self._cache: ByteLRU[tuple[str, str], Anchor] = ByteLRU(local_cache_bytes, Anchor.nbytes)
        self._segments: ByteLRU[str, StoredSegment] = ByteLRU(local_segment_bytes, lambda s: s.kv.nbytes())
        # the segments this store wrote, id -> bytes, oldest first: past the budget the oldest are deleted (one
        # already expired is the oldest, so its entry goes before any live one: no need to track expiry)
        self._written: ByteLRU[str, int] = ByteLRU(self.config.segment_budget_bytes, int)

    def bind_layout(self, layout: KVLayout) -> None:
        self.layout = bound_layout(self.layout, layout)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def take_rejections(self) -> list[Rejection]:
        taken, self._rejections = self._rejections, []
        return taken

    # -- anchors -----------------------------------------------------------------------------------
    def anchors(self, slot: str) -> list[Anchor]:
        ids = [i.decode(errors="replace") for i in self._call(self._redis.zrange, f"{self._p}:pool:{slot}", 0, -1)]
        missing = [i for i in ids if (slot, i) not in self._cache]
        if missing:
            layout = self._layout()
            blobs = self._call(self._redis.mget, [f"{self._p}:anchor:{i}" for i in missing])
            dangling = [anchor_id for anchor_id, blob in zip(missing, blobs, strict=True) if blob is None]
            if dangling:  # evicted under maxmemory, or ids that never had a record: out of the pool
                self._drop_anchors(slot, dangling)
            for anchor_id, blob in zip(missing, blobs, strict=True):
                if blob is None:
                    continue
                anchor = self._open(
                    "anchor",
                    anchor_id,
                    f"{self._p}:anchor:{anchor_id}\x00{slot}",
                    blob,
                    lambda payload, anchor_id=anchor_id: _anchor_from(payload, anchor_id, layout),
                    drop=lambda anchor_id=anchor_id: self._drop_anchors(slot, [anchor_id]),
                )
                if anchor is not None:
                    self._cache.put((slot, anchor_id), anchor)
        found = []
        for anchor_id in ids:
            cached = self._cache.get((slot, anchor_id))
            if cached is not None:
                found.append(cached)
        return found

    def add_anchor(self, slot: str, anchor: Anchor) -> None:
        size = anchor.nbytes()
        if self.config.refuse(size):
            return  # not kept: calls of this slot stay dense rather than fill Redis with one huge anchor
        if self.layout is not None:
            anchor.check(self.layout)
        key = f"{self._p}:anchor:{anchor.anchor_id}"
        pipe = self._redis.pipeline()
        pipe.set(key, self._sealer.seal(f"{key}\x00{slot}", anchor.to_bytes()))
        pipe.zadd(f"{self._p}:pool:{slot}", {anchor.anchor_id: anchor.created})
        pipe.hset(f"{self._p}:uses:{slot}", anchor.anchor_id, 0)
        pipe.zadd(f"{self._p}:all", {f"{slot}\x00{anchor.anchor_id}": anchor.created})
        pipe.hset(f"{self._p}:size", f"{slot}\x00{anchor.anchor_id}", size)
        if self.origin is not None:
            pipe.hset(f"{self._p}:origin", anchor.anchor_id, self.origin)
        self._call(pipe.execute)
        self._cache.put((slot, anchor.anchor_id), anchor)
        self._evict(slot, keep=anchor.anchor_id)

    def mark_used(self, slot: str, anchor_ids: list[str]) -> None:
        origins = self._call(self._redis.hmget, f"{self._p}:origin", anchor_ids) if self.origin and anchor_ids else []
        pipe = self._redis.pipeline()
        for anchor_id in anchor_ids:
            pipe.hincrby(f"{self._p}:uses:{slot}", anchor_id, 1)
        for origin in origins:
            who = origin.decode(errors="replace") if origin is not None else "unknown"
            pipe.hincrby(f"{self._p}:used_by:{self.origin}", who, 1)
        self._call(pipe.execute)

    def used_by(self, user: str) -> dict[str, int]:
        """Anchors the store named `user` has used, counted by the origin that recorded them."""
        raw = self._call(self._redis.hgetall, f"{self._p}:used_by:{user}")
        return {key.decode(errors="replace"): _count(value) for key, value in raw.items()}

    def uses(self, slot: str) -> dict[str, int]:
        raw = self._call(self._redis.hgetall, f"{self._p}:uses:{slot}")
        return {key.decode(errors="replace"): _count(value) for key, value in raw.items()}

    @property
    def anchor_bytes(self) -> int:
        return sum(_count(v) for v in self._call(self._redis.hvals, f"{self._p}:size"))

    def _evict(self, slot: str, keep: str) -> None:
        lock = f"{self._p}:lock:{slot}"
        if not self._call(self._redis.set, lock, "1", nx=True, px=_LOCK_MS):
            return  # another worker is evicting this slot right now
        try:
            while self._call(self._redis.zcard, f"{self._p}:pool:{slot}") > self.config.max_anchors:
                self._evict_least_used(slot, keep)
            while self.anchor_bytes > self.config.budget_bytes:
                oldest = self._call(self._redis.zrange, f"{self._p}:all", 0, 0)
                if not oldest:
                    break
                slot_of_oldest, _, anchor_id = oldest[0].decode(errors="replace").partition("\x00")
                if anchor_id == keep:
                    break
                if not self._evict_least_used(slot_of_oldest, keep):  # its pool is gone (maxmemory): a stale entry
                    pipe = self._redis.pipeline()
                    pipe.zrem(f"{self._p}:all", oldest[0])
                    pipe.hdel(f"{self._p}:size", oldest[0])
                    self._call(pipe.execute)
        finally:
            self._call(self._redis.delete, lock)

    def _evict_least_used(self, slot: str, keep: str) -> bool:
        """Drop the least used of the slot's oldest anchors (never `keep`); False if there was none to drop."""
        window = self.config.window + 1  # one extra in case `keep` is among the oldest
        pool = self._call(self._redis.zrange, f"{self._p}:pool:{slot}", 0, window - 1)
        oldest = [i.decode(errors="replace") for i in pool]
        oldest = [i for i in oldest if i != keep][: self.config.window]
        if not oldest:
            return False
        counts = [_count(u) for u in self._call(self._redis.hmget, f"{self._p}:uses:{slot}", oldest)]
        self._drop_anchors(slot, [oldest[counts.index(min(counts))]])  # index() takes the oldest on ties
        return True

    def _drop_anchors(self, slot: str, anchor_ids: list[str]) -> None:
        """Remove anchors from their slot and every index (their records too)."""
        pipe = self._redis.pipeline()
        for anchor_id in anchor_ids:
            self._cache.pop((slot, anchor_id))
            pipe.zrem(f"{self._p}:pool:{slot}", anchor_id)
            pipe.hdel(f"{self._p}:uses:{slot}", anchor_id)
            pipe.delete(f"{self._p}:anchor:{anchor_id}")
            pipe.zrem(f"{self._p}:all", f"{slot}\x00{anchor_id}")
            pipe.hdel(f"{self._p}:size", f"{slot}\x00{anchor_id}")
            pipe.hdel(f"{self._p}:origin", anchor_id)
        self._call(pipe.execute)

    # -- segments ----------------------------------------------------------------------------------
    def get_segment(self, segment_id: str) -> StoredSegment | None:
        local = self._segments.get(segment_id)
        if local is not None:
            return local
        key = f"{self._p}:segment:{segment_id}"
        blob = self._call(self._redis.get, key)
        if blob is None:
            return None
        layout = self._layout()
        segment = self._open(
            "segment",
            segment_id,
            key,
            blob,
            lambda payload: StoredSegment.from_bytes(payload, layout),
            drop=lambda: self._call(self._redis.delete, key),
        )
        if segment is not None:
            self._segments.put(segment_id, segment)
        return segment

    def put_segment(self, segment_id: str, segment: StoredSegment) -> str | None:
        size = segment.kv.nbytes()
        refused = self.config.refuse(size)
        if refused is not None:
            return refused
        if self.layout is not None:
            segment.check(self.layout)
        key = f"{self._p}:segment:{segment_id}"
        self._call(self._redis.set, key, self._sealer.seal(key, segment.to_bytes()), ex=self._segment_ttl_s)
        self._segments.put(segment_id, segment)
        evicted = self._written.put(segment_id, size)
        if evicted:  # over this store's segment budget: its oldest writes go first
            self._call(self._redis.delete, *(f"{self._p}:segment:{old}" for old, _ in evicted))
        return None

    # -- reading records -----------------------------------------------------------------------------
    def _open(
        self,
        kind: str,
        key: str,
        context: str,
        blob: bytes,
        decode: Callable[[memoryview], T],
        drop: Callable[[], object],
    ) -> T | None:
        """A record's value if it verifies (sealed for `context`) and decodes; else it is dropped (best
        effort), reported, and None."""
        try:
            return decode(self._sealer.open(context, blob))
        except Exception as exc:  # bytes from the store decide nothing: any failure to read them is a bad record
            fault = getattr(exc, "fault", "malformed")
            self._reject(Rejection(kind, key, fault, str(exc) or type(exc).__name__))
        try:
            drop()
        except StoreError as exc:
            log.debug("could not delete the bad %s %s: %s", kind, key, exc)
        return None

    def _reject(self, rejection: Rejection) -> None:
        self._rejections.append(rejection)
        self.rejected[(rejection.kind, rejection.fault)] += 1
        if self.rejected[(rejection.kind, rejection.fault)] == 1:  # once per kind: a poisoned pool would flood the log
            log.warning(
                "KV store at %s: %s; entries that fail to verify or decode read as misses (RedisStore.rejected)",
                redact_url(self.url),
                rejection.line(),
            )

    def _layout(self) -> KVLayout:
        if self.layout is None:
            raise RuntimeError(
                "RedisStore reads records only against the model's KV layout: pass layout=, or hand the store "
                "to a ReusePlanner (it binds its model's)"
            )
        return self.layout

    def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis at {redact_url(self.url)} is unreachable ({exc})") from exc
        except redis.RedisError as exc:  # WRONGTYPE on a key someone overwrote, OOM under noeviction, ...
            raise StoreError(f"Redis at {redact_url(self.url)} refused a command ({exc})") from exc


def redact_url(url: str) -> str:
    """The URL with its password masked: what logs and error messages may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.rsplit('@', 1)[1]}"))


def _anchor_from(payload: memoryview, anchor_id: str, layout: KVLayout) -> Anchor:
    anchor = Anchor.from_bytes(payload, layout)
    if anchor.anchor_id != anchor_id:
        raise RecordInvalid(f"the record under anchor {anchor_id!r} names anchor {anchor.anchor_id!r}")
    return anchor


def _count(raw: bytes | None) -> int:
    """A counter's value; one that is missing or not a number (overwritten) counts as zero."""
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0
