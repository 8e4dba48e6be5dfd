"""Linear layers in the weight formats the engine offers.

`fp32`/`bf16`: dense weights. On CPU they are packed once into oneDNN's blocked layout: for the
2–32-row products of batched decode and speculation this measured 1.3–1.4x faster than MKL's sgemm, and
equal for one row (bench/NOTES.md). On CUDA a plain [out, in] weight through cuBLAS.
`int8`: per-output-channel symmetric int8 through PyTorch's weight-only int8 kernel.
`int4`: group-wise asymmetric 4-bit (group 32) through PyTorch's int4pack kernel; for a Q4_1 GGUF this
reproduces the file's own 4-bit values, since Q4_1 blocks are exactly min/max 4-bit groups of 32.
On this CPU both quantized kernels are compute-bound and slower than fp32 (bench/NOTES.md).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

WeightFormat = Literal["fp32", "bf16", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
_INT4_GROUP = 32


class Linear(Protocol):
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        ...


class DenseLinear:
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:  # weight [out, in]
        self.out_features = weight.shape[0]
        self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class OneDnnLinear:
    """CPU dense linear through oneDNN with the weight pre-packed (fp32, or bf16 on CPUs that have it)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:  # weight [out, in]
        self.out_features = weight.shape[0]
        self.dtype = dtype
        self.packed = weight.to(dtype).contiguous().to_mkldnn()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the op inductor uses for packed weights: dense activations in and out, no layout conversions
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")
        return y.to(x.dtype)


class Int8Linear:
    def __init__(self, weight: torch.Tensor) -> None:  # weight [out, in] fp32
        self.out_features = weight.shape[0]
        self.scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        self.qweight = torch.round(weight / self.scales[:, None]).clamp(-127, 127).to(torch.int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))


class Int4Linear:
    def __init__(self, weight: torch.Tensor) -> None:  # weight [out, in] fp32, in % 32 == 0
        out_features, in_features = weight.shape
        if in_features % _INT4_GROUP:
            raise ValueError(f"int4 weights need in_features divisible by {_INT4_GROUP}, got {in_features}")
        self.out_features = out_features
        groups = weight.reshape(out_features, in_features // _INT4_GROUP, _INT4_GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # [out, G]
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.reshape(out_features, in_features).to(torch.int32), 1
        )
        # The kernel dequantizes as (q - 8) * scale + zero, so zero = low + 8 * scale.  [G, out, 2]
        self.scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.qweight, _INT4_GROUP, self.scales_zeros.to(x.dtype)
        )


def make_linear(weight: torch.Tensor, fmt: WeightFormat, device: torch.device) -> Linear:
    """weight [out, in] in fp32 -> a linear layer in the requested format on `device`."""
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            return OneDnnLinear(weight, dtype)
        return DenseLinear(weight.to(device), dtype)
    if device.type != "cpu":
        raise ValueError(f"weight format {fmt!r} is implemented for CPU; on {device.type} use fp32 or bf16")
    if fmt == "int8":
        return Int8Linear(weight)
    if fmt == "int4":
        return Int4Linear(weight)
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
