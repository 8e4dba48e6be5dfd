"""A decoder layer's decode-sized work in block-quantized weights, as onnxruntime graphs.

What comes before attention and what comes after it run as one graph each, so a decode step makes 2
onnxruntime calls a layer and none of the ~12 torch ops between the matmuls:

    before: (h, cos, sin) -> RMSNorm -> qkv -> RoPE on q and k                [M, d] -> [M, q + 2 kv]
    after:  (h, attn) -> h + o(attn) = h2 -> RMSNorm -> gate_up -> silu(gate) * up -> h2 + down(.)

For a decode step (one sequence's next token, or several sequences' in their KV slots), step_graph.py
chains these node sets through every layer and the head as one graph, with onnxruntime's own attention
(RoPE included) between them; fp32 models use it too, with their dense weights (`dense_layer`). In a
quantized format a speculation verify tree, or a decode the step cannot take, runs these two graphs a layer
at a time with torch's attention (workers/attention.py) between them.

The math is LlamaModel.project_qkv's, attention's and finish_layer's; in a quantized format the activations
entering each matmul are rounded to int8 per group of 32 (MatMulNBits' fast path), as in block_quant_linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .onnx_graph import DenseWeight, GraphBuilder, GraphWeight, OrtGraph, quantize

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
class LayerParts:
    """A layer's matrices in a graph's format (quantized, or fp32 as they are), beside its fp32 norms and shape."""

    weights: LayerWeights
    matrices: dict[str, GraphWeight]

    @property
    def nbytes(self) -> int:
        return sum(matrix.nbytes for matrix in self.matrices.values())


def quantize_layer(weights: LayerWeights, bits: int) -> LayerParts:
    return LayerParts(weights, {name: quantize(getattr(weights, name).float(), bits) for name in MATRICES})


def dense_layer(weights: LayerWeights) -> LayerParts:
    """The layer's fp32 matrices as they are (views of the tensors; onnxruntime packs its own copy at load)."""
    return LayerParts(weights, {name: DenseWeight(getattr(weights, name).float().numpy()) for name in MATRICES})


def qkv_nodes(g: GraphBuilder, parts: LayerParts, h: str, p: str) -> str:
    """Nodes from h [M, d] to the packed qkv [M, Hq * D + 2 * Hkv * D], not rotated; names prefixed by `p`."""
    w = parts.weights
    norm = g.constant(f"{p}attn_norm", w.attn_norm.float().numpy())
    g.node("SimplifiedLayerNormalization", [h, norm], [f"{p}normed_in"], axis=-1, epsilon=w.eps)
    return g.matmul(f"{p}normed_in", parts.matrices["qkv"], f"{p}qkv_raw", name=f"{p}qkv")


def rotated_nodes(g: GraphBuilder, w: LayerWeights, qkv: str, cos: str, sin: str, out: str, p: str) -> str:
    """Nodes from the packed qkv [M, q + 2 kv] to `out`, the same with RoPE applied to q and k (cos/sin [M, D])."""
    q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
    widths = g.constant(f"{p}qkv.widths", np.array([q_width, kv_width, kv_width], np.int64))
    g.node("Split", [qkv, widths], [f"{p}q_raw", f"{p}k_raw", f"{p}v"], axis=-1)
    q = g.rotary(f"{p}q_raw", cos, sin, w.heads, w.head_dim, name=f"{p}q_rope")
    k = g.rotary(f"{p}k_raw", cos, sin, w.kv_heads, w.head_dim, name=f"{p}k_rope")
    g.node("Concat", [q, k, f"{p}v"], [out], axis=-1)
    return out


def finish_nodes(g: GraphBuilder, parts: LayerParts, h: str, attn: str, p: str) -> str:
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


class QuantizedLayer:
    def __init__(self, parts: LayerParts) -> None:
        weights = parts.weights
        self.parts = parts
        hidden, d = weights.o.shape[0], weights.head_dim
        q_width = weights.heads * d
        self.qkv_width = weights.qkv.shape[0]
        self.weight_bytes = parts.nbytes  # what a decode step reads

        before = GraphBuilder()
        rotated_nodes(before, weights, qkv_nodes(before, parts, "h", p=""), "cos", "sin", "qkv", p="")
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
