"""Attention of a forward's new tokens over their sequences' KV caches.

Two paths: the general one runs each sequence chunk on its own (any length, optional custom mask);
the batched-decode path serves the single-token chunks whose caches are slots of one KVSlots buffer with
one indexed write and one SDPA call per layer — on 2 CPU cores that is ~3x cheaper than 8 separate calls.
A cache that reads a shared prefix in place (shared_prefix.py) attends in two parts merged by their
log-sum-exp: the prefix (in a decode group, once for all its members' rows) and its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .forward_batch import SequenceChunk
from .kv_slots import KVSlots, SlotKVCache, shared_prefix
from .shared_prefix import SharedPrefix, attend_part, merge


@dataclass
class DecodeGroup:
    """Single-token chunks over one KVSlots buffer that read the same shared prefix (or none), prepared
    once per forward, used by every layer."""

    slots: KVSlots
    rows: torch.Tensor  # [G] rows of the forward's tokens
    slot_index: torch.Tensor  # [G] slot of each row
    write_pos: torch.Tensor  # [G] slot position the new token's KV goes to (= its cache length)
    lo: int  # slots [lo, hi) are attended as one batch
    hi: int
    mask: torch.Tensor  # [hi - lo, 1, 1, S] True = may attend, over slot positions [start, start + S)
    shared: SharedPrefix | None  # read in place by every member; their own tokens start after it

    @property
    def start(self) -> int:
        return 0 if self.shared is None else self.shared.length

    @classmethod
    def plan(cls, chunks: list[SequenceChunk]) -> tuple[list[DecodeGroup], list[int]]:
        """Split chunks into batched-decode groups and the indices of the rest. A group is the single-token
        chunks over one KVSlots buffer that read one shared prefix, or none: at least two of them, or any
        number reading a prefix (whose part is then computed once for all)."""
        starts, row = [], 0
        for chunk in chunks:
            starts.append(row)
            row += chunk.num_tokens
        members: dict[tuple[int, object], list[int]] = {}
        for i, c in enumerate(chunks):
            if c.num_tokens == 1 and c.attn_mask is None and isinstance(c.cache, SlotKVCache) and c.cache.slots:
                shared = c.cache.shared
                members.setdefault((id(c.cache.slots), shared and shared.identity), []).append(i)
        chosen = [
            indices
            for indices in members.values()
            if len(indices) >= 2 or shared_prefix(chunks[indices[0]].cache) is not None
        ]
        groups = [cls._build([chunks[i] for i in indices], [starts[i] for i in indices]) for indices in chosen]
        grouped = {i for indices in chosen for i in indices}
        return groups, [i for i in range(len(chunks)) if i not in grouped]

    @classmethod
    def _build(cls, chunks: list[SequenceChunk], rows: list[int]) -> DecodeGroup:
        caches = [chunk.cache for chunk in chunks]
        assert all(isinstance(cache, SlotKVCache) for cache in caches)
        slots, shared = caches[0].slots, shared_prefix(caches[0])
        assert slots is not None
        start = 0 if shared is None else shared.length
        slot_index = torch.tensor([cache.index for cache in caches])  # type: ignore[attr-defined]
        write_pos = torch.tensor([cache.length for cache in caches])
        lo, hi = int(slot_index.min()), int(slot_index.max()) + 1
        span = int(write_pos.max()) + 1 - start
        # other slots in the span attend to its first position only: their output is discarded, but must
        # not be NaN (slots hold written KV or zeros)
        limit = torch.zeros(hi - lo, dtype=torch.long)
        limit[slot_index - lo] = write_pos - start
        mask = torch.arange(span)[None, :] <= limit[:, None]  # [hi - lo, S]
        device = slots.keys.device
        return cls(
            slots=slots,
            rows=torch.tensor(rows, device=device),
            slot_index=slot_index.to(device),
            write_pos=write_pos.to(device),
            lo=lo,
            hi=hi,
            mask=mask[:, None, None, :].to(device),
            shared=shared,
        )


def attend(
    layer: int,
    chunks: list[SequenceChunk],
    groups: list[DecodeGroup],
    rest: list[int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Write the new k/v into the caches and attend. q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq * D]."""
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for group in groups:
        _attend_decode_group(layer, group, q, k, v, out)
    starts, row = [], 0
    for chunk in chunks:
        starts.append(row)
        row += chunk.num_tokens
    for i in rest:
        _attend_chunk(layer, chunks[i], starts[i], q, k, v, out)
    return out


def _attend_decode_group(
    layer: int, group: DecodeGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
) -> None:
    keys = group.slots.keys[layer]  # [slots, Hkv, capacity, D]
    values = group.slots.values[layer]
    keys[group.slot_index, :, group.write_pos] = k[group.rows]  # [G, Hkv, D]
    values[group.slot_index, :, group.write_pos] = v[group.rows]
    start, span = group.start, group.mask.shape[-1]
    own_keys = keys[group.lo : group.hi, :, start : start + span]  # [B, Hkv, S, D]
    own_values = values[group.lo : group.hi, :, start : start + span]
    members = group.slot_index - group.lo
    if group.shared is None:
        query = q.new_zeros(group.hi - group.lo, q.shape[1], 1, q.shape[2])  # [B, Hq, 1, D]
        query[members, :, 0] = q[group.rows]
        o = F.scaled_dot_product_attention(query, own_keys, own_values, attn_mask=group.mask, enable_gqa=True)
        out[group.rows] = o[members, :, 0].reshape(len(group.rows), -1)  # (o: [B, Hq, 1, D])
        return
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    rep = heads // kv_heads
    query = q.new_zeros(group.hi - group.lo, kv_heads, rep, dim)  # [B, Hkv, rep, D]: GQA as rows of a KV head
    query[members] = q[group.rows].view(-1, kv_heads, rep, dim)
    own, own_lse = attend_part(query, own_keys, own_values, group.mask)  # [B, Hkv, rep, D], [B, Hkv, rep]
    rows = len(group.rows)
    # every member's rows against the prefix at once: [Hkv, G * rep, D]
    prefix, prefix_lse = group.shared.attend(layer, query[members].transpose(0, 1).reshape(kv_heads, -1, dim))
    merged, _ = merge(
        own[members],
        own_lse[members],
        prefix.view(kv_heads, rows, rep, dim).transpose(0, 1),
        prefix_lse.view(kv_heads, rows, rep).transpose(0, 1),
    )  # [G, Hkv, rep, D]
    out[group.rows] = merged.reshape(rows, -1).to(out.dtype)


def _attend_chunk(
    layer: int,
    chunk: SequenceChunk,
    start: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
) -> None:
    n, past = chunk.num_tokens, chunk.cache.length
    end = start + n
    chunk.cache.write(layer, past, k[start:end].transpose(0, 1), v[start:end].transpose(0, 1))
    shared = shared_prefix(chunk.cache)
    if shared is not None:
        out[start:end] = _attend_after_prefix(layer, chunk, shared, q[start:end])
        return
    keys, values = chunk.cache.layer(layer, past + n)  # [Hkv, S, D]
    query = q[start:end].transpose(0, 1)  # [Hq, n, D]
    mask, causal = chunk.attn_mask, False
    if mask is None and n > 1:
        if past == 0:
            causal = True
        else:  # new token i sits at slot past + i and sees slots <= past + i
            mask = _causal(past, n, q.device)
    o = F.scaled_dot_product_attention(
        query[None], keys[None], values[None], attn_mask=mask, is_causal=causal, enable_gqa=True
    )  # [1, Hq, n, D]
    out[start:end] = o[0].transpose(0, 1).reshape(n, -1)


def _attend_after_prefix(layer: int, chunk: SequenceChunk, shared: SharedPrefix, q: torch.Tensor) -> torch.Tensor:
    """q [n, Hq, D] of a chunk whose cache reads `shared` in place (its new KV already written) -> [n, Hq * D].
    Every new token sees the whole prefix; the chunk's mask (or causality) applies to the own tokens."""
    n, heads, dim = q.shape
    past, first = chunk.cache.length, shared.length
    kv_heads = chunk.cache.keys.shape[1]
    rep = heads // kv_heads
    query = q.view(n, kv_heads, rep, dim).permute(1, 2, 0, 3).reshape(kv_heads, rep * n, dim)  # rows: (rep, n)
    allowed = _causal(past, n, q.device) if chunk.attn_mask is None else chunk.attn_mask  # [n, past + n]
    own_allowed = allowed[:, first:].repeat(rep, 1)  # [rep * n, S]
    keys, values = chunk.cache.layer(layer, past + n)
    own, own_lse = attend_part(query[None], keys[None, :, first:], values[None, :, first:], own_allowed[None, None])
    prefix, prefix_lse = shared.attend(layer, query)
    merged, _ = merge(own[0], own_lse[0], prefix, prefix_lse)  # [Hkv, rep * n, D]
    return merged.view(kv_heads, rep, n, dim).permute(2, 0, 1, 3).reshape(n, -1).to(q.dtype)


def _causal(past: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, past + n] bool: new token i sits at slot past + i and sees slots <= past + i."""
    slots = torch.arange(past + n, device=device)
    return slots[None, :] <= slots[past:, None]
