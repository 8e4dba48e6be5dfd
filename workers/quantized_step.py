"""Batch-1 decode of a block-quantized model as one onnxruntime graph: every layer, the final norm, the head.

An agent answering alone is the common decode: one sequence, one new token a step. Run layer by layer, that
step cost 61 onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which
~7 ms were Python and torch overhead, bench/NOTES.md); as one graph it is one call.

Attention reads the KV cache in place: each layer's KV head j is bound as its own [L, D] input (the cached
tokens, a contiguous run in the cache's [layers, heads, capacity, D] storage), and the new token's own key
and value join inside the graph (quantized_layer.attend_nodes). The new keys and values come out as
[layers, Hkv * D] for the caller to append. A first token (nothing cached) takes the layer-by-layer path.
"""

from __future__ import annotations

import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight
from .quantized_layer import QuantizedParts, attend_nodes, cached_heads, finish_nodes, project_nodes


class QuantizedStep:
    def __init__(self, layers: list[QuantizedParts], final_norm: torch.Tensor, head: QuantizedWeight) -> None:
        first = layers[0].weights
        self.layers, self.kv_heads, self.head_dim = len(layers), first.kv_heads, first.head_dim
        hidden, d, kv_width = first.o.shape[0], first.head_dim, first.kv_heads * first.head_dim
        g = GraphBuilder()
        h, new_keys, new_values, cached = "h", [], [], {}
        for i, parts in enumerate(layers):
            p = f"layer{i}."
            q, k, v = project_nodes(g, parts, h, "cos", "sin", p)
            keys, values = cached_heads(parts.weights, p)
            cached |= {name: ("L", d) for name in keys + values}
            h = finish_nodes(g, parts, h, attend_nodes(g, parts.weights, q, keys, values, p, new=(k, v)), p)
            new_keys.append(k)
            new_values.append(v)
        norm = g.constant("final_norm", final_norm.float().numpy())
        g.node("SimplifiedLayerNormalization", [h, norm], ["final_normed"], axis=-1, epsilon=first.eps)
        g.matmul("final_normed", head, "logits", name="head")
        g.node("Concat", new_keys, ["new_keys"], axis=0)  # [layers, Hkv * D]
        g.node("Concat", new_values, ["new_values"], axis=0)
        outputs = {"logits": head.codes.shape[0], "new_keys": (self.layers, kv_width),
                   "new_values": (self.layers, kv_width)}  # fmt: skip
        self._graph = OrtGraph(g.build({"h": hidden, "cos": d, "sin": d, **cached}, outputs), outputs)
        self._names = [cached_heads(parts.weights, f"layer{i}.") for i, parts in enumerate(layers)]

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [1, d] (the token's embedding), cos/sin [1, D]; attends the cache's `length` tokens, appends this
        token's keys and values to it -> logits [1, V]."""
        past, inputs = cache.length, {}
        for index, (names_k, names_v) in enumerate(self._names):
            keys, values = cache.layer(index, past)  # [Hkv, past, D]
            inputs |= dict(zip(names_k, keys, strict=True)) | dict(zip(names_v, values, strict=True))
        logits, new_keys, new_values = self._graph(h=h, cos=cos, sin=sin, **inputs)
        shape = (self.layers, self.kv_heads, 1, self.head_dim)
        for index, (k, v) in enumerate(zip(new_keys.view(shape), new_values.view(shape), strict=True)):
            cache.write(index, past, k, v)  # [Hkv, 1, D]
        return logits
