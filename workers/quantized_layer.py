"""A decoder layer's decode-sized work in block-quantized weights, as two onnxruntime graphs.

Attention stays in torch (the KV cache, the masks and every reuse mode live there); what comes before and
after it runs as one graph each, so a decode step makes 2 onnxruntime calls a layer instead of 4 and none of
the ~8 torch ops between the matmuls:

    before: h -> RMSNorm -> qkv                                    [M, d] -> [M, q + 2 kv]
    after:  (h, attn) -> h + o(attn) = h2 -> RMSNorm -> gate_up -> silu(gate) * up -> h2 + down(.)

The math is LlamaModel.project_qkv's and finish_layer's; only the activations entering each matmul are
rounded to int8 per group of 32 (MatMulNBits' fast path), as in block_quant_linear.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .onnx_graph import GraphBuilder, OrtGraph, quantize


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights in fp32: [out, in] matrices, [d] norm scales."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    eps: float


class QuantizedLayer:
    def __init__(self, weights: LayerWeights, bits: int) -> None:
        hidden = weights.o.shape[0]
        self.qkv_width = weights.qkv.shape[0]
        parts = {name: quantize(getattr(weights, name).float(), bits) for name in ("qkv", "o", "gate_up", "down")}
        self.weight_bytes = sum(part.nbytes for part in parts.values())  # what a decode step reads

        before = GraphBuilder()
        norm = before.constant("attn_norm", weights.attn_norm.float().numpy())
        before.node("SimplifiedLayerNormalization", ["h", norm], ["normed"], axis=-1, epsilon=weights.eps)
        before.matmul("normed", parts["qkv"], "qkv", name="qkv")
        self._before = OrtGraph(before.build({"h": hidden}, {"qkv": self.qkv_width}), {"qkv": self.qkv_width})

        after = GraphBuilder()
        after.matmul("attn", parts["o"], "attn_out", name="o")
        norm = after.constant("mlp_norm", weights.mlp_norm.float().numpy())
        # normed = RMSNorm(attn_out + h), h2 = attn_out + h (its 4th output)
        after.node(
            "SkipSimplifiedLayerNormalization",
            ["attn_out", "h", norm],
            ["normed", "", "", "h2"],
            domain="com.microsoft",
            epsilon=weights.eps,
        )
        after.matmul("normed", parts["gate_up"], "gate_up", name="gate_up")
        after.node("Split", ["gate_up"], ["gate", "up"], axis=-1, num_outputs=2)
        after.node("Sigmoid", ["gate"], ["gate_sigmoid"])
        after.node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"])
        after.node("Mul", ["gate_silu", "up"], ["swiglu"])  # [M, ffn]
        after.matmul("swiglu", parts["down"], "mlp_out", name="down")
        after.node("Add", ["h2", "mlp_out"], ["out"])
        attn_width = weights.o.shape[1]
        self._after = OrtGraph(after.build({"h": hidden, "attn": attn_width}, {"out": hidden}), {"out": hidden})

    def project_qkv(self, h: torch.Tensor) -> torch.Tensor:
        """h [M, d] -> qkv [M, q + 2 kv], before rotary embedding."""
        return self._before(h=h)[0]

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h [M, d], attn [M, q] -> the layer's output [M, d]."""
        return self._after(h=h, attn=attn)[0]
