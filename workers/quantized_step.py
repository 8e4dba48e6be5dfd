"""Batch-1 decode of a block-quantized model as one onnxruntime graph: every layer, the final norm, the head.

An agent answering alone is the common decode: one sequence, one new token a step. Run layer by layer, that
step cost 61 onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which
~7 ms were Python and torch overhead, bench/NOTES.md); as one graph it is one call.

Attention reads the KV cache in place: each layer's KV head j is bound as its own [L, D] input (the cached
tokens, a contiguous run in the cache's [layers, heads, capacity, D] storage), and the new token's own key
and value join inside the graph (`_attend_nodes`). The new keys and values come out as
[layers, Hkv * D] for the caller to append. A first token (nothing cached) takes the layer-by-layer path.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight
from .quantized_layer import LayerWeights, QuantizedParts, finish_nodes, project_nodes


def _cached_heads(w: LayerWeights, p: str) -> tuple[list[str], list[str]]:
    """Input names of each KV head's cached keys and values."""
    return [f"{p}K{j}" for j in range(w.kv_heads)], [f"{p}V{j}" for j in range(w.kv_heads)]


def _attend_nodes(g: GraphBuilder, w: LayerWeights, q: str, new_k: str, new_v: str, p: str) -> str:
    """Nodes attending one token's q [1, Hq * D] over KV head j's cached {p}K{j} / {p}V{j} [L, D] and the
    token's own new_k / new_v [1, Hkv * D] (not in the cache yet); returns [1, Hq * D]. The new token's score
    joins the L cached ones before the softmax; its weight then scales its value apart from the cached GEMM."""
    group, d = w.heads // w.kv_heads, w.head_dim
    keys, values = _cached_heads(w, p)

    def shape(name: str, *dims: int) -> str:
        return g.constant(f"{p}attention.{name}", np.array(dims, np.int64))

    per_group, per_head, row, one_row = shape("group", group, d), shape("head", w.kv_heads, 1, d), \
        shape("row", 1, group * d), shape("one_row", 1, d)  # fmt: skip
    zero, last, end, axis = shape("zero", 0), shape("last", -1), shape("end", 1 << 62), shape("axis", -1)
    queries = [f"{p}q{j}" for j in range(w.kv_heads)]
    g.node("Split", [q], queries, axis=-1, num_outputs=w.kv_heads)  # query heads j*g .. (j+1)*g - 1
    for kind, name in (("k", new_k), ("v", new_v)):  # [1, Hkv * D] -> Hkv x [1, D]
        g.node("Reshape", [name, per_head], [f"{p}new_{kind}.heads"])
        g.node("Split", [f"{p}new_{kind}.heads"], [f"{p}new_{kind}{j}" for j in range(w.kv_heads)], axis=0,
               num_outputs=w.kv_heads)  # fmt: skip
    outs = []
    for j, query in enumerate(queries):
        k, v = f"{p}new_k{j}", f"{p}new_v{j}"
        g.node("Reshape", [query, per_group], [f"{query}.heads"])  # [g, D]
        g.node("Reshape", [k, one_row], [f"{k}.row"])
        g.node("Reshape", [v, one_row], [f"{v}.row"])
        g.node("Gemm", [f"{query}.heads", keys[j]], [f"{query}.scores"], transB=1, alpha=d**-0.5)  # [g, L]
        g.node("Gemm", [f"{query}.heads", f"{k}.row"], [f"{query}.new_score"], transB=1, alpha=d**-0.5)
        g.node("Concat", [f"{query}.scores", f"{query}.new_score"], [f"{query}.all_scores"], axis=-1)
        g.node("Softmax", [f"{query}.all_scores"], [f"{query}.weights"], axis=-1)  # [g, L + 1]
        g.node("Slice", [f"{query}.weights", zero, last, axis], [f"{query}.cached_w"])
        g.node("Slice", [f"{query}.weights", last, end, axis], [f"{query}.new_w"])
        g.node("Gemm", [f"{query}.cached_w", values[j]], [f"{query}.cached_mix"])  # [g, D]
        g.node("Mul", [f"{query}.new_w", f"{v}.row"], [f"{query}.new_mix"])  # [g, 1] * [1, D]
        g.node("Add", [f"{query}.cached_mix", f"{query}.new_mix"], [f"{query}.mixed"])
        g.node("Reshape", [f"{query}.mixed", row], [f"{query}.out"])
        outs.append(f"{query}.out")
    g.node("Concat", outs, [f"{p}attn"], axis=-1)
    return f"{p}attn"


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
            keys, values = _cached_heads(parts.weights, p)
            cached |= {name: ("L", d) for name in keys + values}
            h = finish_nodes(g, parts, h, _attend_nodes(g, parts.weights, q, k, v, p), p)
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
        self._names = [_cached_heads(parts.weights, f"layer{i}.") for i, parts in enumerate(layers)]

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
