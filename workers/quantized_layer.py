"""A decoder layer's decode-sized work in block-quantized weights, as onnxruntime graphs.

What comes before attention and what comes after it run as one graph each, so a decode step makes 2
onnxruntime calls a layer and none of the ~12 torch ops between the matmuls:

    before: (h, cos, sin) -> RMSNorm -> qkv -> RoPE on q and k                [M, d] -> [M, q + 2 kv]
    after:  (h, attn) -> h + o(attn) = h2 -> RMSNorm -> gate_up -> silu(gate) * up -> h2 + down(.)

When a step is one sequence's next token (batch-1 decode, the common case of an agent answering), attention
joins the second graph (`attend_and_finish`): each KV head's cached keys and values [L, D] are bound in
place (no copy) and attended by two small GEMMs and a softmax per head group, as SDPA would with GQA. Torch's
SDPA had cost ~190 us a layer there on one thread; batched decode and everything with a mask keep torch's
attention (workers/attention.py).

The math is LlamaModel.project_qkv's, attention's and finish_layer's; only the activations entering each
matmul are rounded to int8 per group of 32 (MatMulNBits' fast path), as in block_quant_linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .onnx_graph import GraphBuilder, OrtGraph, QuantizedWeight, quantize


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


def _finish(graph: GraphBuilder, weights: LayerWeights, parts: dict[str, QuantizedWeight], attn: str) -> None:
    """Nodes from the attention output `attn` [M, q] and the input `h` to the layer's output `out`."""
    graph.matmul(attn, parts["o"], "attn_out", name="o")
    norm = graph.constant("mlp_norm", weights.mlp_norm.float().numpy())
    # normed = RMSNorm(attn_out + h); h2 = attn_out + h is its 4th output
    graph.node(
        "SkipSimplifiedLayerNormalization",
        ["attn_out", "h", norm],
        ["normed", "", "", "h2"],
        domain="com.microsoft",
        epsilon=weights.eps,
    )
    graph.matmul("normed", parts["gate_up"], "gate_up", name="gate_up")
    graph.node("Split", ["gate_up"], ["gate", "up"], axis=-1, num_outputs=2)
    graph.node("Sigmoid", ["gate"], ["gate_sigmoid"])
    graph.node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"])
    graph.node("Mul", ["gate_silu", "up"], ["swiglu"])  # [M, ffn]
    graph.matmul("swiglu", parts["down"], "mlp_out", name="down")
    graph.node("Add", ["h2", "mlp_out"], ["out"])


def _attend_one_token(graph: GraphBuilder, weights: LayerWeights) -> str:
    """Nodes attending q [1, Hq * D] over each KV head's keys K{j} / values V{j} [L, D]; returns [1, Hq * D]."""
    group, d = weights.heads // weights.kv_heads, weights.head_dim
    per_group = graph.constant("attention.group_shape", np.array([group, d], np.int64))
    row = graph.constant("attention.row_shape", np.array([1, group * d], np.int64))
    queries = [f"q{j}" for j in range(weights.kv_heads)]
    graph.node("Split", ["q"], queries, axis=-1, num_outputs=weights.kv_heads)  # query heads j*g .. (j+1)*g - 1
    outs = []
    for j, query in enumerate(queries):
        graph.node("Reshape", [query, per_group], [f"{query}.heads"])  # [g, D]
        graph.node("Gemm", [f"{query}.heads", f"K{j}"], [f"{query}.scores"], transB=1, alpha=d**-0.5)  # [g, L]
        graph.node("Softmax", [f"{query}.scores"], [f"{query}.weights"], axis=-1)
        graph.node("Gemm", [f"{query}.weights", f"V{j}"], [f"{query}.mixed"])  # [g, D]
        graph.node("Reshape", [f"{query}.mixed", row], [f"{query}.out"])
        outs.append(f"{query}.out")
    graph.node("Concat", outs, ["attn"], axis=-1)
    return "attn"


class QuantizedLayer:
    def __init__(self, weights: LayerWeights, bits: int) -> None:
        hidden, d = weights.o.shape[0], weights.head_dim
        q_width, kv_width = weights.heads * d, weights.kv_heads * d
        self.qkv_width = weights.qkv.shape[0]
        parts = {name: quantize(getattr(weights, name).float(), bits) for name in ("qkv", "o", "gate_up", "down")}
        self.weight_bytes = sum(part.nbytes for part in parts.values())  # what a decode step reads

        before = GraphBuilder()
        norm = before.constant("attn_norm", weights.attn_norm.float().numpy())
        before.node("SimplifiedLayerNormalization", ["h", norm], ["normed"], axis=-1, epsilon=weights.eps)
        before.matmul("normed", parts["qkv"], "qkv_raw", name="qkv")
        widths = before.constant("qkv.widths", np.array([q_width, kv_width, kv_width], np.int64))
        before.node("Split", ["qkv_raw", widths], ["q_raw", "k_raw", "v"], axis=-1)
        q = before.rotary("q_raw", "cos", "sin", weights.heads, d, name="q_rope")
        k = before.rotary("k_raw", "cos", "sin", weights.kv_heads, d, name="k_rope")
        before.node("Concat", [q, k, "v"], ["qkv"], axis=-1)
        out = {"qkv": self.qkv_width}
        self._before = OrtGraph(before.build({"h": hidden, "cos": d, "sin": d}, out), out)

        after = GraphBuilder()
        _finish(after, weights, parts, "attn")
        out = {"out": hidden}
        self._after = OrtGraph(after.build({"h": hidden, "attn": q_width}, out), out)

        attend = GraphBuilder()
        _finish(attend, weights, parts, _attend_one_token(attend, weights))
        cached = {f"{kind}{j}": ("L", d) for kind in "KV" for j in range(weights.kv_heads)}
        self._attend_after = OrtGraph(attend.build({"h": hidden, "q": q_width, **cached}, out), out)

    def project_qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h [M, d], cos/sin [M, D] -> qkv [M, q + 2 kv] with RoPE applied to q and k."""
        return self._before(h=h, cos=cos, sin=sin)[0]

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h [M, d], attn [M, q] -> the layer's output [M, d]."""
        return self._after(h=h, attn=attn)[0]

    def attend_and_finish(
        self, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """One token: h [1, d], q [1, Hq * D] (rotated), the cache's keys/values [Hkv, L, D] with this token's
        written -> the layer's output [1, d]. Each head's [L, D] must be contiguous (it is bound in place)."""
        heads = {f"K{j}": head for j, head in enumerate(keys)} | {f"V{j}": head for j, head in enumerate(values)}
        return self._attend_after(h=h, q=q, **heads)[0]
