"""Batch-1 decode of a block-quantized model as one onnxruntime graph: every layer, the final norm, the head.

An agent answering alone is the common decode: one sequence, one new token a step. Run layer by layer, that
step cost 61 onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which
~7 ms were Python and torch overhead, bench/NOTES.md); as one graph it is one call.

Attention is onnxruntime's GroupQueryAttention over the KV cache in place: each layer's [Hkv, capacity, D]
keys and values are bound as the op's past and present (the same memory), so the op rotates q and k by the
token's position, writes the new key and value at the cache's `length` and attends the `length + 1` tokens,
with no copy in or out. One node a layer replaced ~45 (splits, reshapes, a GEMM per head and softmaxes):
90 vs 186 us a layer at 512 cached tokens (bench/NOTES.md).
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeTable

from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight, TensorSpec
from .quantized_layer import QuantizedParts, finish_nodes, qkv_nodes


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
        batch_axis = g.constant("batch_axis", np.array([0], np.int64))
        cache = TensorSpec((1, first.kv_heads, "capacity", d))
        h, caches = "h", {}
        for i, parts in enumerate(layers):
            p, w = f"layer{i}.", parts.weights
            past_key, past_value, present_key, present_value = _cache_names(i)
            caches |= {past_key: cache, past_value: cache}
            g.node("Unsqueeze", [qkv_nodes(g, parts, h, p), batch_axis], [f"{p}qkv.batch"])  # [1, 1, q + 2 kv]
            g.node(
                "GroupQueryAttention",
                [f"{p}qkv.batch", "", "", past_key, past_value, "seqlens_k", "total_length", cos, sin, "position"],
                [f"{p}attn.batch", present_key, present_value],
                domain="com.microsoft",
                num_heads=w.heads,
                kv_num_heads=w.kv_heads,
                scale=d**-0.5,
                do_rotary=1,
                rotary_interleaved=0,  # HF's rotate_half layout, as kvcomm/rope.py
            )
            g.node("Squeeze", [f"{p}attn.batch", batch_axis], [f"{p}attn"])  # [1, Hq * D]
            h = finish_nodes(g, parts, h, f"{p}attn", p)
        norm = g.constant("final_norm", final_norm.float().numpy())
        g.node("SimplifiedLayerNormalization", [h, norm], ["final_normed"], axis=-1, epsilon=first.eps)
        g.matmul("final_normed", head, "logits", name="head")
        inputs = {
            "h": hidden,
            "position": TensorSpec((1, 1), np.int64),
            "seqlens_k": TensorSpec((1,), np.int32),  # tokens cached before this one
            "total_length": TensorSpec((), np.int32),  # ... and with it
            **caches,
        }
        outputs = {"logits": (1, head.codes.shape[0])}
        outputs |= {name: cache for i in range(self.layers) for name in _cache_names(i)[2:]}
        self._graph = OrtGraph(g.build(inputs, outputs), outputs)

    @staticmethod
    def fits(cache: KVCache) -> bool:
        """Whether the op can work in this cache: each layer's [Hkv, capacity, D] contiguous (a private cache
        or a KV slot) with room for one more token."""
        return cache.length < cache.capacity and cache.keys[0].is_contiguous() and cache.values[0].is_contiguous()

    def __call__(self, h: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [1, d] (the token's embedding) at `position` [1]; attends the cache's `length` tokens and writes
        this token's keys and values after them (the caller advances `length`) -> logits [1, V]."""
        if not self.fits(cache):
            raise ValueError("QuantizedStep needs a cache with contiguous layers and a free slot (see fits)")
        past = cache.length
        lengths = {
            "position": position.view(1, 1).to(torch.int64),
            "seqlens_k": torch.tensor([past], dtype=torch.int32),
            "total_length": torch.tensor(past + 1, dtype=torch.int32),
        }
        pasts: dict[str, torch.Tensor] = {}
        presents: dict[str, torch.Tensor] = {}  # the same memory: the op appends in place
        for index in range(self.layers):
            past_key, past_value, present_key, present_value = _cache_names(index)
            keys, values = cache.keys[index][None], cache.values[index][None]  # [1, Hkv, capacity, D]
            pasts |= {past_key: keys, past_value: values}
            presents |= {present_key: keys, present_value: values}
        return self._graph.run({"h": h} | lengths | pasts, into=presents)[0]
