"""The prefix cache against synthetic KV whose every slot encodes the token prefix that produced it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.prefix_cache import PrefixCache, PrefixCacheConfig, PrefixNode

LAYERS, HEADS, DIM = 2, 1, 4
PER_TOKEN = 2 * LAYERS * HEADS * DIM * 4  # keys + values, float32


def make_kv(token_ids: Sequence[int]) -> KVCache:
    """Slot p depends on all of token_ids[: p + 1], as real KV does; exact in float32 (codes < 2**20)."""
    codes, h = [], 0
    for t in token_ids:
        h = (h * 31 + t + 1) % 65521
        codes.append(h)
    code = torch.tensor(codes, dtype=torch.float32).view(1, 1, -1, 1)  # [1, 1, T, 1]
    layer = torch.arange(LAYERS, dtype=torch.float32).view(-1, 1, 1, 1)
    dim = torch.arange(DIM, dtype=torch.float32).view(1, 1, 1, -1)
    keys = (code * 16 + layer * 4 + dim).expand(LAYERS, HEADS, len(codes), DIM)  # [L, H, T, D]
    return KVCache.from_tensors(keys, -keys - 0.5)


def loaded(pc: PrefixCache, token_ids: Sequence[int], max_tokens: int | None = None) -> KVCache:
    """Match, load into a fresh cache, release."""
    m = pc.match(token_ids, max_tokens)
    cache = KVCache(LAYERS, HEADS, DIM, capacity=1)
    pc.load(m, cache)
    pc.release(m)
    assert cache.length == m.num_tokens
    return cache


def assert_kv(cache: KVCache, token_ids: Sequence[int]) -> None:
    expected = make_kv(token_ids)
    n = len(token_ids)
    assert cache.length == n
    assert torch.equal(cache.keys[:, :, :n], expected.keys[:, :, :n])
    assert torch.equal(cache.values[:, :, :n], expected.values[:, :, :n])


def check_tree(pc: PrefixCache) -> None:
    """Structure, byte/node counts, and every node's KV equal to the KV of its full token prefix."""
    bs, nbytes, count = pc.config.block_size, 0, 0
    stack: list[tuple[PrefixNode, tuple[int, ...]]] = [(pc._root, ())]
    while stack:
        node, prefix = stack.pop()
        for key, child in node.children.items():
            assert child.parent is node and key == child.tokens[:bs]
            assert len(child.tokens) > 0 and len(child.tokens) % bs == 0
            assert child.keys is not None and child.values is not None and child.keys.is_contiguous()
            full = prefix + child.tokens
            expected = make_kv(full)
            assert torch.equal(child.keys, expected.keys[:, :, len(prefix) :])
            assert torch.equal(child.values, expected.values[:, :, len(prefix) :])
            nbytes, count = nbytes + child.nbytes, count + 1
            stack.append((child, full))
    assert pc.nbytes == nbytes and pc.num_nodes == count


def all_nodes(pc: PrefixCache) -> list[PrefixNode]:
    out, stack = [], list(pc._root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def seq(seed: int, n: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_validation() -> None:
    for bad in ({"block_size": 0}, {"block_size": -3}, {"budget_bytes": 0}, {"block_size": 1.5}, {"block_size": True}):
        with pytest.raises(ValueError, match="positive int"):
            PrefixCacheConfig(**bad)


def test_insert_match_load_exact_and_tree_owns_its_kv() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    ids = seq(0, 12)
    cache = make_kv(ids)
    assert pc.insert(ids, cache) == 12
    cache.keys.fill_(float("nan"))  # the caller keeps mutating its cache
    assert_kv(loaded(pc, [*ids, 7, 8]), ids)
    # load appends after whatever the caller already holds
    m = pc.match(ids)
    target = make_kv([5, 6, 7])
    pc.load(m, target)
    pc.release(m)
    assert target.length == 15
    assert torch.equal(target.keys[:, :, 3:15], make_kv(ids).keys)
    assert torch.equal(target.values[:, :, :3], make_kv([5, 6, 7]).values)
    check_tree(pc)


def test_partial_block_tail_not_cached() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    ids = seq(1, 14)
    assert pc.insert(ids, make_kv(ids)) == 12
    assert pc.nbytes == 12 * PER_TOKEN
    assert pc.match(ids).num_tokens == 12
    assert pc.match(ids[:11]).num_tokens == 8
    assert pc.insert(ids[:3], make_kv(ids[:3])) == 0
    assert pc.insert(ids, make_kv(ids)) == 0  # already cached


def test_max_tokens_cap() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    ids = seq(2, 16)
    pc.insert(ids, make_kv(ids))
    assert_kv(loaded(pc, ids, max_tokens=10), ids[:8])
    assert loaded(pc, ids, max_tokens=15).length == 12
    empty = pc.match(ids, max_tokens=3)
    assert empty.num_tokens == 0 and empty.nodes == []
    assert pc.match(ids, max_tokens=0).num_tokens == 0
    assert pc.match([]).num_tokens == 0


def test_divergence_splits_node_and_both_branches_load() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    a = seq(3, 16)
    b = a[:6] + seq(4, 10)  # diverges inside the second block: shares one block
    pc.insert(a, make_kv(a))
    assert pc.num_nodes == 1
    assert pc.insert(b, make_kv(b)) == 12
    assert pc.num_nodes == 3
    assert pc.nbytes == (16 + 12) * PER_TOKEN
    assert_kv(loaded(pc, a), a)
    assert_kv(loaded(pc, b), b)
    assert loaded(pc, [*a[:6], 5000, 5001]).length == 4
    check_tree(pc)


def test_leaving_a_node_midway_does_not_jump_to_its_child() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=2))
    for s in ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]):
        pc.insert(s, make_kv(s))
    assert pc.match([0, 0, 1, 1, 1, 1]).num_tokens == 4  # (1, 1) is the child's key, but not at this offset


def test_split_of_pinned_node_keeps_match_loadable_and_pins_balanced() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    a = seq(5, 16)
    pc.insert(a, make_kv(a))
    held = pc.match(a[:10])  # ends inside the node: 8 tokens
    b = a[:4] + seq(6, 8)
    pc.insert(b, make_kv(b))  # splits the pinned node after its first block
    assert all(n.refcount == 1 for n in held.nodes[-1].path())
    cache = KVCache(LAYERS, HEADS, DIM)
    pc.load(held, cache)
    assert_kv(cache, a[:8])
    pc.release(held)
    pc.release(held)  # a second release does nothing
    assert all(n.refcount == 0 for n in all_nodes(pc))
    with pytest.raises(ValueError, match="released"):
        pc.load(held, KVCache(LAYERS, HEADS, DIM))
    assert pc.evict(1 << 30) == (16 + 8) * PER_TOKEN
    assert pc.nbytes == 0 and pc.num_nodes == 0


def test_pins_prevent_eviction() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    a, b = seq(7, 8), seq(8, 8)
    pc.insert(a, make_kv(a))
    pc.insert(b, make_kv(b))
    m = pc.match(a)
    assert pc.evict(1 << 30) == 8 * PER_TOKEN  # only b goes
    assert pc.match(b).num_tokens == 0
    assert_kv(loaded(pc, a), a)
    pc.release(m)
    assert pc.evict(1 << 30) == 8 * PER_TOKEN
    assert pc.num_nodes == 0


def test_pins_holding_the_budget_mean_new_tokens_are_not_kept() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4, budget_bytes=8 * PER_TOKEN))
    a, b = seq(9, 8), seq(10, 8)
    pc.insert(a, make_kv(a))
    m = pc.match(a)
    assert pc.insert(b, make_kv(b)) == 0
    assert pc.nbytes == 8 * PER_TOKEN
    assert_kv(loaded(pc, a), a)
    pc.release(m)
    assert pc.insert(b, make_kv(b)) == 8  # now a is evictable
    assert pc.match(a).num_tokens == 0


def test_lru_order_and_parent_becomes_evictable() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4, budget_bytes=12 * PER_TOKEN))
    a, b, c = seq(11, 4), seq(12, 4), seq(13, 4)
    for s in (a, b, c):
        pc.insert(s, make_kv(s))
    pc.release(pc.match(a))  # a is now more recent than b
    d = seq(14, 4)
    assert pc.insert(d, make_kv(d)) == 4
    assert [pc.match(s).num_tokens for s in (a, b, c, d)] == [4, 0, 4, 4]
    pc2 = PrefixCache(PrefixCacheConfig(block_size=4))
    x = seq(15, 8)
    pc2.insert(x, make_kv(x))
    pc2.insert(x[:4] + seq(16, 4), make_kv(x[:4] + seq(16, 4)))
    assert pc2.num_nodes == 3
    assert pc2.evict(1 << 30) == 12 * PER_TOKEN  # both leaves, then their shared parent
    assert pc2.num_nodes == 0 and pc2.nbytes == 0


def test_budget_respected_when_nothing_pinned() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4, budget_bytes=40 * PER_TOKEN))
    base = seq(17, 32)
    for i in range(30):
        s = base[: (i * 7) % 24] + seq(100 + i, 5 + (i * 13) % 40)
        pc.insert(s, make_kv(s))
        assert pc.nbytes <= pc.config.budget_bytes
        check_tree(pc)
    huge = seq(18, 100)
    assert pc.insert(huge, make_kv(huge)) == 40  # only what fits the budget at all
    assert pc.nbytes <= pc.config.budget_bytes


def test_counters_and_clear() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4, budget_bytes=8 * PER_TOKEN))
    a, b = seq(19, 8), seq(20, 8)
    pc.insert(a, make_kv(a))
    pc.release(pc.match(a))
    pc.release(pc.match(a, max_tokens=5))
    pc.release(pc.match(b))
    assert (pc.queries, pc.hits_tokens, pc.evicted_bytes) == (3, 12, 0)
    pc.insert(b, make_kv(b))
    assert pc.evicted_bytes == 8 * PER_TOKEN
    held = pc.match(b)
    pc.clear()
    assert pc.nbytes == 0 and pc.num_nodes == 0 and pc.match(b).num_tokens == 0
    cache = KVCache(LAYERS, HEADS, DIM)
    pc.load(held, cache)  # a match from before clear still holds its KV
    assert_kv(cache, b)
    pc.release(held)


def test_insert_needs_the_kv() -> None:
    pc = PrefixCache(PrefixCacheConfig(block_size=4))
    with pytest.raises(ValueError, match="holds only"):
        pc.insert(seq(21, 8), make_kv(seq(21, 4)))


tokens = st.lists(st.integers(0, 1), max_size=14)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), tokens, st.none()),
        st.tuples(st.just("match"), tokens, st.one_of(st.none(), st.integers(0, 14))),
        st.tuples(st.just("hold"), tokens, st.none()),
        st.tuples(st.just("release"), st.just([]), st.none()),
    ),
    max_size=25,
)


def run_model(ops: list, budget_tokens: int) -> None:
    bs = 2
    pc = PrefixCache(PrefixCacheConfig(block_size=bs, budget_bytes=budget_tokens * PER_TOKEN))
    exact = budget_tokens >= 14 * 25  # nothing can be evicted: compare lengths with the model
    cached: set[tuple[int, ...]] = set()  # the brute-force model: every cached whole-block prefix
    held: list[tuple[object, list[int]]] = []
    for op, ids, cap in ops:
        if op == "insert":
            pc.insert(ids, make_kv(ids))
            cached.update(tuple(ids[:k]) for k in range(bs, len(ids) + 1, bs))
            assert pc.nbytes <= pc.config.budget_bytes
        elif op in ("match", "hold"):
            limit = len(ids) if cap is None else min(cap, len(ids))
            best = max((k for k in range(0, limit + 1, bs) if k == 0 or tuple(ids[:k]) in cached), default=0)
            m = pc.match(ids, cap)
            assert m.num_tokens <= best and m.num_tokens % bs == 0
            if exact:
                assert m.num_tokens == best
            if op == "hold":
                held.append((m, ids))
            else:
                cache = KVCache(LAYERS, HEADS, DIM)
                pc.load(m, cache)
                assert_kv(cache, ids[: m.num_tokens])
                pc.release(m)
        elif held:
            m, ids = held.pop(0)
            cache = KVCache(LAYERS, HEADS, DIM)
            pc.load(m, cache)  # possibly after splits and evictions around it
            assert_kv(cache, ids[: m.num_tokens])
            pc.release(m)
        check_tree(pc)
        pins: dict[int, int] = {}
        for m, _ in held:
            for n in m.nodes[-1].path() if m.nodes else []:
                pins[id(n)] = pins.get(id(n), 0) + 1
        assert all(n.refcount == pins.get(id(n), 0) for n in all_nodes(pc))
    for m, _ in held:
        pc.release(m)
    assert all(n.refcount == 0 for n in all_nodes(pc))


@settings(max_examples=200, deadline=None, database=None)
@given(ops)
def test_model_large_budget(ops: list) -> None:
    run_model(ops, budget_tokens=1 << 20)


@settings(max_examples=200, deadline=None, database=None)
@given(ops, st.integers(2, 12))
def test_model_small_budget(ops: list, budget_tokens: int) -> None:
    run_model(ops, budget_tokens)
