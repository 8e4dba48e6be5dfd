"""Anchor pools and segment KVs: eviction rules, bytes, and the Redis store shared by two workers.

(What the stores refuse - tampered, malformed or oversized records - is tested in test_store_hardening.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from kvmesh.kvcomm import embedded_redis
from kvmesh.kvcomm.anchor import Anchor
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.kv_cache import KVCache, KVLayout
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.kvcomm.store import MemoryStore, PoolConfig, StoredSegment, StoreUnavailable

LAYOUT = KVLayout(num_layers=3, num_kv_heads=1, head_dim=4, dtype=torch.float32, vocab_size=100, signature_layers=1)


def kv(tokens: int, fill: float, layers: int = 3) -> KVCache:
    return KVCache.from_tensors(torch.full((layers, 1, tokens, 4), fill), torch.full((layers, 1, tokens, 4), -fill))


def anchor(name: str, created: float, tokens: int = 5) -> Anchor:
    return Anchor(name, kv(tokens, created, layers=1), kv(tokens, created), kv(2, created), created)


def fill(store, slot: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        store.add_anchor(slot, anchor(name, float(i + 1)))


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.fail(embedded_redis.INSTALL_HINT)  # the set-up installs it: its absence is a broken machine
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(params=["memory", "redis"])
def make_store(request, redis_url):
    prefix = f"t{request.node.name}"

    def make(config: PoolConfig) -> MemoryStore | RedisStore:
        store = MemoryStore(config) if request.param == "memory" else RedisStore(redis_url, config, prefix=prefix)
        store.bind_layout(LAYOUT)
        return store

    return make


def test_a_full_slot_evicts_the_least_used_of_its_oldest(make_store):
    store = make_store(PoolConfig(max_anchors=3, window=2))
    fill(store, "s", ["a", "b", "c"])
    store.mark_used("s", ["a"])
    store.add_anchor("s", anchor("d", 4.0))  # oldest two: a (used once), b (never) -> b goes
    assert [a.anchor_id for a in store.anchors("s")] == ["a", "c", "d"]
    store.mark_used("s", ["c", "c"])
    store.add_anchor("s", anchor("e", 5.0))  # oldest two: a (1), c (2) -> a goes
    assert [a.anchor_id for a in store.anchors("s")] == ["c", "d", "e"]
    assert [a.anchor_id for a in store.anchors("other")] == []


def test_the_byte_budget_holds_across_slots(make_store):
    one = anchor("x", 0.0).nbytes()
    store = make_store(PoolConfig(max_anchors=10, window=1, budget_bytes=3 * one))
    fill(store, "s1", ["a", "b"])
    fill(store, "s2", ["c", "d"])
    assert store.anchor_bytes <= 3 * one
    remaining = [a.anchor_id for slot in ("s1", "s2") for a in store.anchors(slot)]
    assert len(remaining) == 3 and "d" in remaining


def test_anchors_and_segments_round_trip_with_their_tensors(make_store):
    store = make_store(PoolConfig())
    original = anchor("a", 1.5)
    store.add_anchor("s", original)
    loaded = store.anchors("s")[0]
    assert loaded.anchor_id == "a" and loaded.created == 1.5
    torch.testing.assert_close(loaded.delta.keys[:, :, :5], original.delta.keys[:, :, :5])
    assert loaded.next_text is not None and loaded.next_text.length == 2
    store.put_segment("seg", StoredSegment([5, 6, 7], kv(3, 2.0)))
    segment = store.get_segment("seg")
    assert segment is not None and segment.token_ids == [5, 6, 7] and segment.kv.length == 3
    assert store.get_segment("missing") is None


def test_two_workers_share_one_pool_through_redis(redis_url):
    first, second = RedisStore(redis_url, prefix="shared"), RedisStore(redis_url, prefix="shared", layout=LAYOUT)
    first.add_anchor("slot", anchor("from-first", 1.0))
    assert [a.anchor_id for a in second.anchors("slot")] == ["from-first"]
    second.mark_used("slot", ["from-first"])
    assert first.uses("slot") == {"from-first": 1}


def test_segments_a_worker_wrote_or_read_are_served_locally_within_its_budget(redis_url):
    one = kv(3, 1.0).nbytes()
    writer = RedisStore(redis_url, prefix="tlocal", layout=LAYOUT, local_segment_bytes=2 * one)
    reader = RedisStore(redis_url, prefix="tlocal", layout=LAYOUT, local_segment_bytes=2 * one)
    for i, name in enumerate("abc"):
        writer.put_segment(name, StoredSegment([i] * 3, kv(3, float(i))))
    assert reader.get_segment("c").token_ids == [2] * 3  # another worker's segment comes through Redis
    writer._redis.delete("tlocal:segment:b", "tlocal:segment:c")  # expired in Redis, say
    assert writer.get_segment("c").token_ids == [2] * 3 and writer.get_segment("b").token_ids == [1] * 3  # local
    assert reader.get_segment("c").token_ids == [2] * 3 and reader.get_segment("b") is None  # b never reached it
    assert writer.get_segment("a").token_ids == [0] * 3  # evicted locally (budget of two), fetched from Redis again
    writer._redis.delete("tlocal:segment:a")
    assert writer.get_segment("c") is None  # the least recently used went to make room for a


def test_named_stores_count_whose_anchors_each_one_used(redis_url):
    first = RedisStore(redis_url, prefix="origins", origin="worker-0")
    second = RedisStore(redis_url, prefix="origins", origin="worker-1")
    first.add_anchor("slot", anchor("a", 1.0))
    second.add_anchor("slot", anchor("b", 2.0))
    second.mark_used("slot", ["a", "b", "a"])
    assert second.used_by("worker-1") == {"worker-0": 2, "worker-1": 1}
    assert first.used_by("worker-0") == {}


def test_a_lost_redis_is_reported_as_unavailable():
    with EmbeddedRedis() as server:
        store = RedisStore(server.url, prefix="gone", layout=LAYOUT)
        store.add_anchor("s", anchor("a", 1.0))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.anchors("s")


def test_a_missing_redis_server_names_the_install_step(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y redis-server"):
        EmbeddedRedis()
