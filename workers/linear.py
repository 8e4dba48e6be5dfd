"""Linear layers in the weight formats the engine offers.

`fp32`/`bf16`: dense weights. On CPU they are packed once into oneDNN's blocked layout: for the
2–32-row products of batched decode and speculation this measured 1.3–1.4x faster than MKL's sgemm, and
equal for one row (bench/NOTES.md). On CUDA a plain [out, in] weight through cuBLAS.
`int8`: symmetric 8-bit in groups of 32 (Q8_0's scheme), `int4`: asymmetric 4-bit in groups of 32 (Q4_1's
scheme), both through onnxruntime's MatMulNBits for decode-sized products and in fp32 for prefill
(block_quant_linear.py says why that library and why both); a GGUF's own Q8_0 / Q4_1 tensors are reproduced
exactly. An int4 model keeps its output head in int8, as llama.cpp's 4-bit files do (this model's GGUF stores
it Q8_0): the head's precision is the logits'.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from .block_quant_linear import BlockQuantLinear

WeightFormat = Literal["fp32", "bf16", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
QUANTIZED_FORMATS: dict[str, int] = {"int8": 8, "int4": 4}  # format -> bits (CPU only)


class Linear(Protocol):
    out_features: int
    weight_bytes: int  # what one product reads of the weights (packed codes and scales included)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        ...


class DenseLinear:
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:  # weight [out, in]
        self.out_features = weight.shape[0]
        self.weight = weight.to(dtype).contiguous()
        self.weight_bytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class OneDnnLinear:
    """CPU dense linear through oneDNN with the weight pre-packed (fp32, or bf16 on CPUs that have it)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:  # weight [out, in]
        self.out_features = weight.shape[0]
        self.dtype = dtype
        self.packed = weight.to(dtype).contiguous().to_mkldnn()
        self.weight_bytes = weight.numel() * self.packed.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the op inductor uses for packed weights: dense activations in and out, no layout conversions
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")
        return y.to(x.dtype)


def make_linear(weight: torch.Tensor, fmt: WeightFormat, device: torch.device) -> Linear:
    """weight [out, in] in fp32 -> a linear layer in the requested format on `device`."""
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            return OneDnnLinear(weight, dtype)
        return DenseLinear(weight.to(device), dtype)
    if device.type != "cpu":
        raise ValueError(f"weight format {fmt!r} is implemented for CPU; on {device.type} use fp32 or bf16")
    if fmt in QUANTIZED_FORMATS:
        return BlockQuantLinear(weight, bits=QUANTIZED_FORMATS[fmt], dense=make_linear(weight, "fp32", device))
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")


def head_format(fmt: WeightFormat) -> WeightFormat:
    """The output head's format for a model whose layers are in `fmt` (int4 keeps an int8 head)."""
    return "int8" if fmt == "int4" else fmt
