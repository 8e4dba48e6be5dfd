"""Block-quantized CPU linears (groups of 32 along the input) through onnxruntime's MatMulNBits kernel.

Why this library: on CPUs without AVX-512 VNNI, PyTorch's own int8/int4 weight-only kernels are 4-12x
slower than its fp32 GEMV (bench/NOTES.md), so reading fewer bytes bought nothing. onnxruntime's MLAS picks
a MatMulNBits kernel by the CPU's ISA at start-up (AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI), quantizes the
activations to int8 per block (as llama.cpp's Q8 activations) and reads the packed weights once: a
3072x576 one-row product measured 47-51 us against fp32's 113-343 us, and 512 rows ran at fp32's rate.
The graphs and the weight schemes are in onnx_graph.py; a decoder layer's decode work is fused in
quantized_layer.py, and this class serves a lone linear (the output head).

Only decode-sized products take that kernel. Prompt chunks always run in fp32 (llama.py: their KV is kept
and shared, so it must not depend on the batch), and any other product of DENSE_FROM_ROWS rows or more too:
prefill is compute-bound, so 4 bits buy it nothing, and MatMulNBits ran with torch's parallel ops between its
calls at 0.7x fp32's prefill rate (2,048 tokens) because two thread pools then share two cores. The price is
memory (fp32 beside the packed codes).

While the quantized kernels compute a decode step, torch runs on one thread (`decode_threads`): torch's own
ops there are small, and its idle OpenMP threads spinning beside onnxruntime's pool had made int4 decode
slower than fp32 (66 vs 45 ms/token).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .onnx_graph import GraphBuilder, OrtGraph, quantize

if TYPE_CHECKING:
    from .linear import Linear  # linear.py builds these layers: a runtime import would be circular

DENSE_FROM_ROWS = 64  # 1- to 32-row products ran 1.8-3x faster in 4 bits; 128 rows tied (bench/NOTES.md)


@contextmanager
def decode_threads(rows: int) -> Iterator[None]:
    """Run torch on one thread while a forward of `rows` rows takes the quantized kernels (see above)."""
    threads = torch.get_num_threads()
    if rows >= DENSE_FROM_ROWS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BlockQuantLinear:
    """[N, in] fp32 -> [N, out] fp32 with 4- or 8-bit weights in groups of 32 along `in` (fp32 for prefill)."""

    def __init__(self, weight: torch.Tensor, bits: int, dense: Linear) -> None:  # weight [out, in] fp32
        quantized = quantize(weight.float(), bits)
        self.quantized = quantized  # the codes, for graphs that fold this product in (step_graph.py)
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.dense = dense  # the same weight in fp32, for products of DENSE_FROM_ROWS rows or more
        self.weight_bytes = quantized.nbytes  # what a decode step reads
        graph = GraphBuilder()
        graph.matmul("x", quantized, "y", name="linear")
        outputs = {"y": self.out_features}
        self._graph = OrtGraph(graph.build({"x": self.in_features}, outputs), outputs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        if x.shape[0] >= DENSE_FROM_ROWS:
            return self.dense(x)
        return self._graph(x=x)[0]
