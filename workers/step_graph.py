"""A decode step on CPU as one onnxruntime graph: every layer, the final norm, the head.

A decode step is one new token for each of B sequences. Run layer by layer, one sequence's int4 step cost 61
onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which ~7 ms were
Python and torch overhead, bench/NOTES.md); as one graph it is one call. An fp32 model's step is the same
graph over its dense weights: torch's eager decode spends about half its time between the matmuls on this
size of model, and the graph measured 2x faster (bench/NOTES.md).

Attention is onnxruntime's GroupQueryAttention over the KV buffer in place: each layer's [B, Hkv, capacity,
D] keys and values are bound as the op's past and present (the same memory), so the op rotates q and k by
each token's position, writes each row's new key and value at that row's length and attends the tokens up
to it, with no copy in or out. One node a layer replaced ~45 (splits, reshapes, a GEMM per head and
softmaxes): 90 vs 186 us a layer at 512 cached tokens (bench/NOTES.md).

The buffer is a sequence's own cache (B = 1) or a run of KVSlots' slots [lo, hi): sequences decoding in
one step share the weights' read. The op writes a key and value in *every* row, so a slot in the run that
this step does not decode (free, held by a sequence prefilling in the same forward, or verifying a tree)
gets its row's discarded output at its length, past what it holds: nothing reads there before its own
tokens overwrite it (a prompt chunk's torch pass and a tree's call run after the decodes' calls). A holder
with no room left there keeps the whole run off the step (llama.py says where).

A speculation tree (the pending token and its draft nodes, under the tree's mask) is one row of S tokens:
the op attends causally within the new tokens and the mask, as an additive bias, hides non-ancestors;
its keys and values land after the row's length in node order, as the torch path writes them. The op
takes several new tokens per row only with one row, so each tree is a call of its own. Verifying a
17-node tree through the graph costs about one decode step, where torch eager's costs three (bench/NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeTable

from .forward_batch import SequenceChunk
from .kv_slots import KVSlots, SlotKVCache, shared_prefix
from .onnx_graph import GraphBuilder, GraphWeight, OrtGraph, TensorSpec
from .quantized_layer import LayerParts, finish_nodes, qkv_nodes


@dataclass
class StepCall:
    """One run of the step graph over one KV buffer: B rows of one new token (decodes; a row with none is
    padded, see the module's docstring), or one row of S (a speculation tree)."""

    keys: torch.Tensor  # [layers, B, Hkv, capacity, D]: every layer's [B, Hkv, capacity, D] is contiguous
    values: torch.Tensor
    lengths: torch.Tensor  # [B] long: tokens each buffer row holds; its new tokens' keys and values go after them
    tokens: int  # S
    chunks: list[int]  # the forward's chunks this call runs ...
    buffer_rows: list[int]  # ... and the buffer row of each


def fits(cache: KVCache, tokens: int = 1) -> bool:
    """Whether the step can run `tokens` new tokens in this cache: each layer's [Hkv, capacity, D] contiguous (a
    private cache or a KV slot) with room for them, and all of its KV there (not reading a shared prefix in
    place, which the graph's attention cannot merge in)."""
    contiguous = cache.keys[0].is_contiguous() and cache.values[0].is_contiguous()
    return cache.length + tokens <= cache.capacity and contiguous and shared_prefix(cache) is None


def plan_step_calls(chunks: list[SequenceChunk]) -> tuple[list[StepCall], list[int]]:
    """The step calls that run a forward's generated tokens: one per KV buffer (a KVSlots buffer, or a private
    cache) for its single-token decodes, one per speculation tree (a chunk under a mask: the graph's attention
    takes several new tokens in a row only for one row); and the indices of the chunks left for the other paths
    (prompts, caches the step cannot take)."""
    calls: list[StepCall | None] = []
    trees: list[StepCall | None] = []  # after the decodes: a decode call's pad row may write in a tree's slot
    decodes: dict[int, tuple[KVSlots, list[int]]] = {}  # buffer id -> the buffer, its chunks
    for i, chunk in enumerate(chunks):
        cache, tree = chunk.cache, chunk.attn_mask is not None
        if chunk.prompt or (chunk.num_tokens > 1 and not tree) or not fits(cache, chunk.num_tokens):
            continue  # (unmarked causal runs of tokens are prompts, as ForwardBatch.single has them)
        if tree and not _within_causal(chunk):
            continue  # the graph's attention is causal: a mask can only hide more (as a tree's does)
        if not (isinstance(cache, SlotKVCache) and cache.slots is not None):
            lengths = torch.tensor([cache.length])
            calls.append(StepCall(cache.keys[:, None], cache.values[:, None], lengths, chunk.num_tokens, [i], [0]))
        elif tree:
            trees.append(_over_slots(cache.slots, chunks, [i]))
        else:
            decodes.setdefault(id(cache.slots), (cache.slots, []))[1].append(i)
    calls += [_over_slots(slots, chunks, members) for slots, members in decodes.values()]
    taken = [call for call in calls + trees if call is not None]
    served = {i for call in taken for i in call.chunks}
    return taken, [i for i in range(len(chunks)) if i not in served]


def _within_causal(chunk: SequenceChunk) -> bool:
    """Whether the chunk's mask lets no token see a later one of the chunk."""
    assert chunk.attn_mask is not None
    own = chunk.attn_mask[:, chunk.cache.length :]  # [n, n]
    return not bool(torch.triu(own, diagonal=1).any())


def _over_slots(slots: KVSlots, chunks: list[SequenceChunk], members: list[int]) -> StepCall | None:
    indices = [chunks[i].cache.index for i in members]  # type: ignore[attr-defined]
    tokens = max(chunks[i].num_tokens for i in members)
    lo, hi = min(indices), max(indices) + 1
    lengths = torch.zeros(hi - lo, dtype=torch.long)  # a free slot's row writes at 0
    for slot in range(lo, hi):
        holder = slots.holder(slot)
        if holder is not None:
            if holder.length + tokens > slots.capacity:  # no room for the row's writes: see the module's docstring
                return None
            lengths[slot - lo] = holder.length
    return StepCall(slots.keys[:, lo:hi], slots.values[:, lo:hi], lengths, tokens, members, [i - lo for i in indices])


def _cache_names(index: int) -> tuple[str, str, str, str]:
    """A layer's cached keys and values as the graph's inputs (past) and outputs (present)."""
    p = f"layer{index}."
    return f"{p}past_key", f"{p}past_value", f"{p}present_key", f"{p}present_value"


class StepGraph:
    def __init__(self, layers: list[LayerParts], final_norm: torch.Tensor, head: GraphWeight, rope: RopeTable) -> None:
        first = layers[0].weights
        hidden, d = first.o.shape[0], first.head_dim
        self.layers = len(layers)
        g = GraphBuilder()
        # GroupQueryAttention's RoPE tables: [positions, D / 2], the first half of RopeTable's (halves repeat)
        cos = g.constant("cos_table", rope.cos[:, : d // 2].float().cpu().numpy())
        sin = g.constant("sin_table", rope.sin[:, : d // 2].float().cpu().numpy())
        q_width = first.heads * d
        flat = g.constant("flat_attn", np.array([-1, q_width], np.int64))
        cache = TensorSpec(("B", first.kv_heads, "capacity", d))
        h, caches = "h", {}
        for i, parts in enumerate(layers):
            p, w = f"layer{i}.", parts.weights
            past_key, past_value, present_key, present_value = _cache_names(i)
            caches |= {past_key: cache, past_value: cache}
            g.node("Reshape", [qkv_nodes(g, parts, h, p), "row_tokens"], [f"{p}qkv.rows"])  # [B, S, q + 2 kv]
            g.node(
                "GroupQueryAttention",
                [
                    f"{p}qkv.rows",
                    *("", "", past_key, past_value, "seqlens_k", "total_length", cos, sin),
                    *("position", "attention_bias"),
                ],
                [f"{p}attn.rows", present_key, present_value],
                domain="com.microsoft",
                num_heads=w.heads,
                kv_num_heads=w.kv_heads,
                scale=d**-0.5,
                do_rotary=1,
                rotary_interleaved=0,  # HF's rotate_half layout, as kvcomm/rope.py
            )
            g.node("Reshape", [f"{p}attn.rows", flat], [f"{p}attn"])  # [B * S, Hq * D]
            h = finish_nodes(g, parts, h, f"{p}attn", p)
        norm = g.constant("final_norm", final_norm.float().numpy())
        g.node("SimplifiedLayerNormalization", [h, norm], ["final_normed"], axis=-1, epsilon=first.eps)
        g.matmul("final_normed", head, "logits", name="head")
        inputs = {
            "h": hidden,  # [B * S, d]
            "row_tokens": TensorSpec((3,), np.int64),  # (B, S, q + 2 kv): the rows' shape for attention
            "position": TensorSpec(("B", "S"), np.int64),
            "seqlens_k": TensorSpec(("B",), np.int32),  # tokens each row holds with its new ones, minus one
            "total_length": TensorSpec((), np.int32),  # the most any row holds with its new ones
            "attention_bias": TensorSpec(("B", 1, "S", "T")),  # 0 or -inf: a tree's mask within the causal one
            **caches,
        }
        self.qkv_width = first.qkv.shape[0]
        outputs = {"logits": head.out_features}
        outputs |= {name: cache for i in range(self.layers) for name in _cache_names(i)[2:]}
        self._graph = OrtGraph(g.build(inputs, outputs), outputs, g.external)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, call: StepCall) -> torch.Tensor:
        """h [B * S, d] (the tokens' embeddings, S per buffer row) at positions [B, S], under bias [B, 1, S,
        max length + S] (0 where a token may attend, -inf where a tree hides it; causal order applies anyway):
        each row attends its length's cached tokens and its own earlier ones, and gets its keys and values
        written after its length (the caller advances the lengths of the caches it serves) -> logits [B * S, V]."""
        rows, tokens = len(call.lengths), call.tokens
        lengths = {
            "row_tokens": torch.tensor([rows, tokens, self.qkv_width]),
            "position": positions.to(torch.int64),
            "seqlens_k": (call.lengths + tokens - 1).to(torch.int32),
            "total_length": (call.lengths.max() + tokens).to(torch.int32),
            "attention_bias": bias,
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
