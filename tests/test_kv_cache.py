"""KVCache: serialization, tree compaction (keep), select/slice/concat, truncation and growth."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeSpec, cos_sin, rotate

L, H, D = 3, 2, 8


def _random(
    tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, H, tokens, D, generator=gen).to(dtype)
    values = torch.randn(L, H, tokens, D, generator=gen).to(dtype)
    return KVCache.from_tensors(keys, values), keys, values


def _filled(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.keys[:, :, : cache.length], cache.values[:, :, : cache.length]


def _assert_holds(cache: KVCache, keys: torch.Tensor, values: torch.Tensor) -> None:
    got_keys, got_values = _filled(cache)
    assert cache.length == keys.shape[2]
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


# -- bytes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip_is_exact(dtype):
    cache, keys, values = _random(13, dtype)
    cache.reserve(100)  # spare capacity must not travel
    data = cache.to_bytes()
    assert len(data) < cache.nbytes() + 200
    back = KVCache.from_bytes(data, dtype)
    assert back.dtype == dtype
    _assert_holds(back, keys, values)
    if dtype == torch.bfloat16:  # bf16 travels as its raw 16-bit pattern: bit-exact, not via a float cast
        assert torch.equal(back.keys.view(torch.int16)[:, :, :13], keys.view(torch.int16))


def test_bytes_record_layout():
    cache, _, _ = _random(4)
    record = msgpack.unpackb(cache.to_bytes())
    assert record["dtype"] == "float32" and record["shape"] == [L, H, 4, D]
    assert len(record["keys"]) == len(record["values"]) == L * H * 4 * D * 4


def test_bytes_round_trip_of_an_empty_cache():
    empty = KVCache(L, H, D)
    back = KVCache.from_bytes(empty.to_bytes(), torch.float32)
    assert back.length == 0 and back.dtype == torch.float32
    assert (back.num_layers, back.keys.shape[1], back.keys.shape[3]) == (L, H, D)
    back.append(_random(2)[0])
    assert back.length == 2


def test_nbytes_counts_the_filled_part():
    cache, _, _ = _random(10, torch.bfloat16)
    cache.reserve(500)
    assert cache.nbytes() == 2 * L * H * 10 * D * 2


# -- keep (speculation tree compaction) --------------------------------------------------------------------
def test_keep_packs_the_chosen_slots_after_start():
    cache, keys, values = _random(10)
    cache.keep(4, [5, 7, 9])
    order = [0, 1, 2, 3, 5, 7, 9]
    _assert_holds(cache, keys[:, :, order], values[:, :, order])


def test_keep_nothing_and_keep_identity():
    cache, keys, values = _random(10)
    cache.keep(6, [6, 7, 8, 9])
    _assert_holds(cache, keys, values)
    cache.keep(6, [])
    _assert_holds(cache, keys[:, :, :6], values[:, :, :6])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_keep_matches_select_reference(data):
    length = data.draw(st.integers(1, 20))
    start = data.draw(st.integers(0, length))
    slots = sorted(data.draw(st.sets(st.integers(start, length - 1))) if start < length else set())
    cache, keys, values = _random(length, seed=length)
    cache.keep(start, slots)
    order = list(range(start)) + slots
    _assert_holds(cache, keys[:, :, order], values[:, :, order])


# -- select / slice / concat / append ----------------------------------------------------------------------
def test_select_takes_slots_in_the_given_order_into_a_new_cache():
    cache, keys, values = _random(8)
    picked = cache.select([6, 1, 1, 3])
    _assert_holds(picked, keys[:, :, [6, 1, 1, 3]], values[:, :, [6, 1, 1, 3]])
    picked.keys.zero_()
    _assert_holds(cache, keys, values)  # a copy, not a view


def test_slice_is_a_copy_and_checks_bounds():
    cache, keys, values = _random(8)
    part = cache.slice(2, 5)
    _assert_holds(part, keys[:, :, 2:5], values[:, :, 2:5])
    _assert_holds(cache.slice(3), keys[:, :, 3:], values[:, :, 3:])
    _assert_holds(cache.slice(8), keys[:, :, 8:], values[:, :, 8:])
    part.values.fill_(7.0)
    _assert_holds(cache, keys, values)
    for bad in ((-1, 3), (5, 4), (0, 9)):
        with pytest.raises(ValueError, match="outside"):
            cache.slice(*bad)


def test_append_and_concat():
    a, ka, va = _random(5, seed=1)
    b, kb, vb = _random(70, seed=2)  # larger than a's capacity: append must grow
    c, kc, vc = _random(3, seed=3)
    joined = KVCache.concat([a, b, c])
    _assert_holds(joined, torch.cat([ka, kb, kc], dim=2), torch.cat([va, vb, vc], dim=2))
    _assert_holds(a, ka, va)  # inputs untouched
    a.append(b)
    _assert_holds(a, torch.cat([ka, kb], dim=2), torch.cat([va, vb], dim=2))
    with pytest.raises(ValueError, match="at least one"):
        KVCache.concat([])


def test_windows_write_into_their_cache_in_place():
    a, ka, va = _random(4, seed=1)
    b, kb, vb = _random(6, seed=2)
    out = KVCache.empty_like(a, capacity=10)
    out.window(0, 4).fill_from(a)
    second = out.window(4, 10)
    second.fill_from(b)
    second.keys.mul_(2)  # an in-place edit of the window (as a correction or a RoPE move does) lands in out
    out.length = 10
    _assert_holds(out, torch.cat([ka, 2 * kb], dim=2), torch.cat([va, vb], dim=2))
    _assert_holds(b, kb, vb)  # the source is untouched
    with pytest.raises(ValueError, match="cannot fill a 4-token cache from a 6-token"):
        out.window(0, 4).fill_from(b)
    with pytest.raises(ValueError, match="outside a cache of capacity 10"):
        out.window(8, 11)


def test_clone_is_independent():
    cache, keys, values = _random(6)
    copy = cache.clone()
    copy.keys.add_(1.0)
    copy.truncate(2)
    _assert_holds(cache, keys, values)


def test_from_tensors_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[L,H,T,D\]"):
        KVCache.from_tensors(torch.zeros(L, H, 4, D), torch.zeros(L, H, 5, D))
    with pytest.raises(ValueError, match=r"\[L,H,T,D\]"):
        KVCache.from_tensors(torch.zeros(H, 4, D), torch.zeros(H, 4, D))


# -- truncate ------------------------------------------------------------------------------------------
def test_truncate_and_its_errors():
    cache, keys, values = _random(10)
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="cannot truncate a 10-token cache"):
            cache.truncate(bad)
    assert cache.length == 10
    cache.truncate(4)
    _assert_holds(cache, keys[:, :, :4], values[:, :, :4])
    with pytest.raises(ValueError):
        cache.truncate(5)  # the dropped slots are gone, not hidden
    other, ko, vo = _random(2, seed=9)
    cache.append(other)  # writes after the new end
    _assert_holds(cache, torch.cat([keys[:, :, :4], ko], dim=2), torch.cat([values[:, :, :4], vo], dim=2))
    cache.truncate(0)
    assert cache.length == 0 and len(cache) == 0


# -- growth -------------------------------------------------------------------------------------------
def test_reserve_grows_by_doubling_and_preserves_contents():
    cache, keys, values = _random(64)
    assert cache.capacity == 64
    pointer = cache.keys.data_ptr()
    cache.reserve(0)
    assert cache.keys.data_ptr() == pointer  # enough room: no reallocation
    cache.reserve(1)
    assert cache.capacity == 128
    _assert_holds(cache, keys, values)
    cache.reserve(1000)
    assert cache.capacity == 1064
    _assert_holds(cache, keys, values)


def test_a_small_cache_grows_to_fit():
    cache = KVCache(L, H, D, capacity=1)
    for step in range(1, 40):
        _, k, v = _random(1, seed=step)
        cache.reserve(1)
        cache.write(0, cache.length, k[0], v[0])
        cache.length += 1
        assert torch.equal(cache.keys[0, :, step - 1], k[0, :, 0])
    assert cache.length == 39 and cache.capacity >= 39


# -- RoPE shift of a stored cache ---------------------------------------------------------------------
def test_shift_rotates_filled_keys_only_and_leaves_values():
    spec = RopeSpec(head_dim=D, theta=10000.0)
    positions = torch.arange(5, 17)
    raw_keys = torch.randn(L, H, 12, D, generator=torch.Generator().manual_seed(4))
    cos, sin = cos_sin(spec, positions, torch.float32)
    cache, _, values = _random(12)
    cache.keys[:, :, :12] = rotate(raw_keys, cos, sin)
    cache.reserve(10)
    cache.keys[:, :, 12:] = 7.0  # reserve's fresh slots are uninitialized, and a NaN there never equals itself
    spare = cache.keys[:, :, 12:].clone()
    cache.shift(40, spec)
    cos, sin = cos_sin(spec, positions + 40, torch.float32)
    assert (cache.keys[:, :, :12] - rotate(raw_keys, cos, sin)).abs().max() <= 1e-5
    assert torch.equal(cache.values[:, :, :12], values)
    assert torch.equal(cache.keys[:, :, 12:], spare)
    cache.shift(-45, spec)
    cos, sin = cos_sin(spec, positions - 5, torch.float32)
    assert (cache.keys[:, :, :12] - rotate(raw_keys, cos, sin)).abs().max() <= 1e-5
