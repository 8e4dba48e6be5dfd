"""Decode of a block-quantized model as one onnxruntime graph: every layer, the final norm, the head.

A decode step is one new token for each of B sequences. Run layer by layer, one sequence's step cost 61
onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which ~7 ms were
Python and torch overhead, bench/NOTES.md); as one graph it is one call.

Attention is onnxruntime's GroupQueryAttention over the KV buffer in place: each layer's [B, Hkv, capacity,
D] keys and values are bound as the op's past and present (the same memory), so the op rotates q and k by
each token's position, writes each row's new key and value at that row's length and attends the tokens up
to it, with no copy in or out. One node a layer replaced ~45 (splits, reshapes, a GEMM per head and
softmaxes): 90 vs 186 us a layer at 512 cached tokens (bench/NOTES.md).

The buffer is a sequence's own cache (B = 1) or a run of KVSlots' slots [lo, hi): sequences decoding in
one step share the weights' read. The op writes a key and value in *every* row, so a slot in the run that
this step does not decode (free, or held by a sequence prefilling in the same forward) gets its row's
discarded output at its length, past what it holds: nothing reads there before its own next token
overwrites it. A holder with no room left there keeps the whole run on the layer-by-layer path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeTable

from .forward_batch import SequenceChunk
from .kv_slots import KVSlots, SlotKVCache, shared_prefix
from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight, TensorSpec
from .quantized_layer import QuantizedParts, finish_nodes, qkv_nodes


@dataclass
class StepCall:
    """One run of the step graph: B rows over one KV buffer, serving some of a forward's chunks."""

    keys: torch.Tensor  # [layers, B, Hkv, capacity, D]: every layer's [B, Hkv, capacity, D] is contiguous
    values: torch.Tensor
    lengths: torch.Tensor  # [B] long: tokens each buffer row holds; its new token's key and value go there
    chunks: list[int]  # the forward's chunks this call decodes ...
    buffer_rows: list[int]  # ... and the buffer row of each


def fits(cache: KVCache) -> bool:
    """Whether the step can decode in this cache: each layer's [Hkv, capacity, D] contiguous (a private cache
    or a KV slot) with room for one more token, and all of its KV there (not reading a shared prefix in place,
    which the graph's attention cannot merge in)."""
    contiguous = cache.keys[0].is_contiguous() and cache.values[0].is_contiguous()
    return cache.length < cache.capacity and contiguous and shared_prefix(cache) is None


def plan_step_calls(chunks: list[SequenceChunk]) -> tuple[list[StepCall], list[int]]:
    """The step calls that decode a forward's generated single tokens (one call per KVSlots buffer, one per
    private cache), and the indices of the chunks left for the other paths."""
    calls: list[StepCall] = []
    by_buffer: dict[int, tuple[KVSlots, list[int], list[int]]] = {}  # id -> the buffer, its chunks, their slots
    for i, chunk in enumerate(chunks):
        cache = chunk.cache
        if chunk.num_tokens != 1 or chunk.prompt or chunk.attn_mask is not None or not fits(cache):
            continue
        if isinstance(cache, SlotKVCache) and cache.slots is not None:
            _, members, indices = by_buffer.setdefault(id(cache.slots), (cache.slots, [], []))
            members.append(i)
            indices.append(cache.index)
        else:
            calls.append(StepCall(cache.keys[:, None], cache.values[:, None], torch.tensor([cache.length]), [i], [0]))
    for slots, members, indices in by_buffer.values():
        call = _over_slots(slots, indices, members)
        if call is not None:
            calls.append(call)
    served = {i for call in calls for i in call.chunks}
    return calls, [i for i in range(len(chunks)) if i not in served]


def _over_slots(slots: KVSlots, indices: list[int], members: list[int]) -> StepCall | None:
    lo, hi = min(indices), max(indices) + 1
    lengths = torch.zeros(hi - lo, dtype=torch.long)  # a free slot's row writes at 0
    for slot in range(lo, hi):
        holder = slots.holder(slot)
        if holder is not None:
            if holder.length >= slots.capacity:  # no room for the row's write: see the module's docstring
                return None
            lengths[slot - lo] = holder.length
    return StepCall(slots.keys[:, lo:hi], slots.values[:, lo:hi], lengths, members, [i - lo for i in indices])


def _cache_names(index: int) -> tuple[str, str, str, str]:
    """A layer's cached keys and values as the graph's inputs (past) and outputs (present)."""
    p = f"layer{index}."
    return f"{p}past_key", f"{p}past_value", f"{p}present_key", f"{p}present_value"


class QuantizedStep:
    def __init__(
        self, layers: list[QuantizedParts], final_norm: torch.Tensor, head: QuantizedWeight, rope: RopeTable
    ) -> None:
        first = layers[0].weights
        hidden, d = first.o.shape[0], first.head_dim
        self.layers = len(layers)
        g = GraphBuilder()
        # GroupQueryAttention's RoPE tables: [positions, D / 2], the first half of RopeTable's (halves repeat)
        cos = g.constant("cos_table", rope.cos[:, : d // 2].float().cpu().numpy())
        sin = g.constant("sin_table", rope.sin[:, : d // 2].float().cpu().numpy())
        token_axis = g.constant("token_axis", np.array([1], np.int64))
        cache = TensorSpec(("M", first.kv_heads, "capacity", d))
        h, caches = "h", {}
        for i, parts in enumerate(layers):
            p, w = f"layer{i}.", parts.weights
            past_key, past_value, present_key, present_value = _cache_names(i)
            caches |= {past_key: cache, past_value: cache}
            g.node("Unsqueeze", [qkv_nodes(g, parts, h, p), token_axis], [f"{p}qkv.rows"])  # [B, 1, q + 2 kv]
            g.node(
                "GroupQueryAttention",
                [f"{p}qkv.rows", "", "", past_key, past_value, "seqlens_k", "total_length", cos, sin, "position"],
                [f"{p}attn.rows", present_key, present_value],
                domain="com.microsoft",
                num_heads=w.heads,
                kv_num_heads=w.kv_heads,
                scale=d**-0.5,
                do_rotary=1,
                rotary_interleaved=0,  # HF's rotate_half layout, as kvcomm/rope.py
            )
            g.node("Squeeze", [f"{p}attn.rows", token_axis], [f"{p}attn"])  # [B, Hq * D]
            h = finish_nodes(g, parts, h, f"{p}attn", p)
        norm = g.constant("final_norm", final_norm.float().numpy())
        g.node("SimplifiedLayerNormalization", [h, norm], ["final_normed"], axis=-1, epsilon=first.eps)
        g.matmul("final_normed", head, "logits", name="head")
        inputs = {
            "h": hidden,
            "position": TensorSpec(("M", 1), np.int64),
            "seqlens_k": TensorSpec(("M",), np.int32),  # tokens each row holds before this one
            "total_length": TensorSpec((), np.int32),  # the most any row holds with it
            **caches,
        }
        outputs = {"logits": head.codes.shape[0]}
        outputs |= {name: cache for i in range(self.layers) for name in _cache_names(i)[2:]}
        self._graph = OrtGraph(g.build(inputs, outputs), outputs)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, call: StepCall) -> torch.Tensor:
        """h [B, d] (the tokens' embeddings, one per buffer row) at positions [B]: each row attends its
        length's cached tokens and gets its key and value written after them (the caller advances the
        lengths of the caches it serves) -> logits [B, V]."""
        lengths = {
            "position": positions.view(-1, 1).to(torch.int64),
            "seqlens_k": call.lengths.to(torch.int32),
            "total_length": (call.lengths.max() + 1).to(torch.int32),
        }
        pasts: dict[str, torch.Tensor] = {}
        presents: dict[str, torch.Tensor] = {}  # the same memory: the op appends in place
        for index in range(self.layers):
            past_key, past_value, present_key, present_value = _cache_names(index)
            keys, values = call.keys[index], call.values[index]  # [B, Hkv, capacity, D]
            if not (keys.is_contiguous() and values.is_contiguous()):
                raise ValueError("a step call's KV buffer must be contiguous per layer (see fits)")
            pasts |= {past_key: keys, past_value: values}
            presents |= {present_key: keys, present_value: values}
        return self._graph.run({"h": h} | lengths | pasts, into=presents)[0]
