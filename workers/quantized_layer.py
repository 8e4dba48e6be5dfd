"""A decoder layer's decode-sized work in block-quantized weights, as onnxruntime graphs.

What comes before attention and what comes after it run as one graph each, so a decode step makes 2
onnxruntime calls a layer and none of the ~12 torch ops between the matmuls:

    before: (h, cos, sin) -> RMSNorm -> qkv -> RoPE on q and k                [M, d] -> [M, q + 2 kv]
    after:  (h, attn) -> h + o(attn) = h2 -> RMSNorm -> gate_up -> silu(gate) * up -> h2 + down(.)

For one token of one sequence (batch-1 decode, an agent answering), quantized_step.py chains these node
sets, with attention between them (`attend_nodes`), through every layer and the head as one graph; batched
decode and anything with a mask keep torch's attention (workers/attention.py) between these two graphs.

The math is LlamaModel.project_qkv's, attention's and finish_layer's; only the activations entering each
matmul are rounded to int8 per group of 32 (MatMulNBits' fast path), as in block_quant_linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight, quantize

MATRICES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights in fp32 ([out, in] matrices, [d] norm scales) and its attention's shape."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class QuantizedParts:
    """A layer's matrices quantized, beside its fp32 norms and shape."""

    weights: LayerWeights
    matrices: dict[str, QuantizedWeight]

    @property
    def nbytes(self) -> int:
        return sum(matrix.nbytes for matrix in self.matrices.values())


def quantize_layer(weights: LayerWeights, bits: int) -> QuantizedParts:
    return QuantizedParts(weights, {name: quantize(getattr(weights, name).float(), bits) for name in MATRICES})


def project_nodes(g: GraphBuilder, parts: QuantizedParts, h: str, cos: str, sin: str, p: str) -> tuple[str, str, str]:
    """Nodes from h [M, d] to q [M, Hq * D], k, v [M, Hkv * D], q and k rotated; names prefixed by `p`."""
    w = parts.weights
    q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
    norm = g.constant(f"{p}attn_norm", w.attn_norm.float().numpy())
    g.node("SimplifiedLayerNormalization", [h, norm], [f"{p}normed_in"], axis=-1, epsilon=w.eps)
    g.matmul(f"{p}normed_in", parts.matrices["qkv"], f"{p}qkv_raw", name=f"{p}qkv")
    widths = g.constant(f"{p}qkv.widths", np.array([q_width, kv_width, kv_width], np.int64))
    g.node("Split", [f"{p}qkv_raw", widths], [f"{p}q_raw", f"{p}k_raw", f"{p}v"], axis=-1)
    q = g.rotary(f"{p}q_raw", cos, sin, w.heads, w.head_dim, name=f"{p}q_rope")
    k = g.rotary(f"{p}k_raw", cos, sin, w.kv_heads, w.head_dim, name=f"{p}k_rope")
    return q, k, f"{p}v"


def finish_nodes(g: GraphBuilder, parts: QuantizedParts, h: str, attn: str, p: str) -> str:
    """Nodes from the attention output `attn` [M, q] and the layer input `h` to the layer's output."""
    w = parts.weights
    g.matmul(attn, parts.matrices["o"], f"{p}attn_out", name=f"{p}o")
    norm = g.constant(f"{p}mlp_norm", w.mlp_norm.float().numpy())
    # normed = RMSNorm(attn_out + h); h2 = attn_out + h is its 4th output
    g.node(
        "SkipSimplifiedLayerNormalization",
        [f"{p}attn_out", h, norm],
        [f"{p}normed", "", "", f"{p}h2"],
        domain="com.microsoft",
        epsilon=w.eps,
    )
    g.matmul(f"{p}normed", parts.matrices["gate_up"], f"{p}gate_up", name=f"{p}gate_up")
    g.node("Split", [f"{p}gate_up"], [f"{p}gate", f"{p}up"], axis=-1, num_outputs=2)
    g.node("Sigmoid", [f"{p}gate"], [f"{p}gate_sigmoid"])
    g.node("Mul", [f"{p}gate", f"{p}gate_sigmoid"], [f"{p}gate_silu"])
    g.node("Mul", [f"{p}gate_silu", f"{p}up"], [f"{p}swiglu"])  # [M, ffn]
    g.matmul(f"{p}swiglu", parts.matrices["down"], f"{p}mlp_out", name=f"{p}down")
    g.node("Add", [f"{p}h2", f"{p}mlp_out"], [f"{p}out"])
    return f"{p}out"


def attend_nodes(
    g: GraphBuilder,
    w: LayerWeights,
    q: str,
    keys: list[str],
    values: list[str],
    p: str,
    new: tuple[str, str] | None = None,
) -> str:
    """Nodes attending one token's q [1, Hq * D] over KV head j's keys[j] / values[j] [L, D]; returns
    [1, Hq * D]. With `new` = (k, v) [1, Hkv * D], that token's own key and value join the L cached ones
    (the cache does not hold them yet)."""
    group, d = w.heads // w.kv_heads, w.head_dim
    per_group = g.constant(f"{p}attention.group_shape", np.array([group, d], np.int64))
    per_head = g.constant(f"{p}attention.head_shape", np.array([w.kv_heads, 1, d], np.int64))
    row = g.constant(f"{p}attention.row_shape", np.array([1, group * d], np.int64))
    queries = [f"{p}q{j}" for j in range(w.kv_heads)]
    g.node("Split", [q], queries, axis=-1, num_outputs=w.kv_heads)  # query heads j*g .. (j+1)*g - 1
    if new is not None:
        ends = {
            "last": g.constant(f"{p}attention.last", np.array([-1], np.int64)),
            "big": g.constant(f"{p}attention.big", np.array([1 << 62], np.int64)),
            "zero": g.constant(f"{p}attention.zero", np.array([0], np.int64)),
            "axis": g.constant(f"{p}attention.axis", np.array([-1], np.int64)),
        }
        for kind, name in zip("kv", new, strict=True):  # [1, Hkv * D] -> Hkv x [1, D]
            g.node("Reshape", [name, per_head], [f"{p}new_{kind}.heads"])
            g.node(
                "Split",
                [f"{p}new_{kind}.heads"],
                [f"{p}new_{kind}{j}" for j in range(w.kv_heads)],
                axis=0,
                num_outputs=w.kv_heads,
            )
    outs = []
    for j, query in enumerate(queries):
        g.node("Reshape", [query, per_group], [f"{query}.heads"])  # [g, D]
        g.node("Gemm", [f"{query}.heads", keys[j]], [f"{query}.scores"], transB=1, alpha=d**-0.5)  # [g, L]
        if new is None:
            g.node("Softmax", [f"{query}.scores"], [f"{query}.weights"], axis=-1)
            g.node("Gemm", [f"{query}.weights", values[j]], [f"{query}.mixed"])  # [g, D]
        else:
            new_k, new_v = (f"{p}new_{kind}{j}" for kind in "kv")
            g.node("Reshape", [new_k, g.constant(f"{p}new_k{j}.shape", np.array([1, d], np.int64))], [f"{new_k}.row"])
            g.node("Reshape", [new_v, g.constant(f"{p}new_v{j}.shape", np.array([1, d], np.int64))], [f"{new_v}.row"])
            g.node("Gemm", [f"{query}.heads", f"{new_k}.row"], [f"{query}.new_score"], transB=1, alpha=d**-0.5)
            g.node("Concat", [f"{query}.scores", f"{query}.new_score"], [f"{query}.all_scores"], axis=-1)
            g.node("Softmax", [f"{query}.all_scores"], [f"{query}.weights"], axis=-1)  # [g, L + 1]
            g.node("Slice", [f"{query}.weights", ends["zero"], ends["last"], ends["axis"]], [f"{query}.cached_w"])
            g.node("Slice", [f"{query}.weights", ends["last"], ends["big"], ends["axis"]], [f"{query}.new_w"])
            g.node("Gemm", [f"{query}.cached_w", values[j]], [f"{query}.cached_mix"])  # [g, D]
            g.node("Mul", [f"{query}.new_w", f"{new_v}.row"], [f"{query}.new_mix"])  # [g, 1] * [1, D]
            g.node("Add", [f"{query}.cached_mix", f"{query}.new_mix"], [f"{query}.mixed"])
        g.node("Reshape", [f"{query}.mixed", row], [f"{query}.out"])
        outs.append(f"{query}.out")
    g.node("Concat", outs, [f"{p}attn"], axis=-1)
    return f"{p}attn"


def cached_heads(w: LayerWeights, p: str = "") -> tuple[list[str], list[str]]:
    """Input names of each KV head's cached keys and values."""
    return [f"{p}K{j}" for j in range(w.kv_heads)], [f"{p}V{j}" for j in range(w.kv_heads)]


class QuantizedLayer:
    def __init__(self, parts: QuantizedParts) -> None:
        weights = parts.weights
        self.parts = parts
        hidden, d = weights.o.shape[0], weights.head_dim
        q_width = weights.heads * d
        self.qkv_width = weights.qkv.shape[0]
        self.weight_bytes = parts.nbytes  # what a decode step reads

        before = GraphBuilder()
        q, k, v = project_nodes(before, parts, "h", "cos", "sin", p="")
        before.node("Concat", [q, k, v], ["qkv"], axis=-1)
        out = {"qkv": self.qkv_width}
        self._before = OrtGraph(before.build({"h": hidden, "cos": d, "sin": d}, out), out)

        after = GraphBuilder()
        finish_nodes(after, parts, "h", "attn", p="")  # -> "out"
        out = {"out": hidden}
        self._after = OrtGraph(after.build({"h": hidden, "attn": q_width}, out), out)

    def project_qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h [M, d], cos/sin [M, D] -> qkv [M, q + 2 kv] with RoPE applied to q and k."""
        return self._before(h=h, cos=cos, sin=sin)[0]

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h [M, d], attn [M, q] -> the layer's output [M, d]."""
        return self._after(h=h, attn=attn)[0]
