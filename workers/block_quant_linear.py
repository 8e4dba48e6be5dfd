"""Block-quantized CPU linears (groups of 32 along the input) through onnxruntime's MatMulNBits kernel.

Why this library: on CPUs without AVX-512 VNNI, PyTorch's own int8/int4 weight-only kernels are 4-12x
slower than its fp32 GEMV (bench/NOTES.md), so reading fewer bytes bought nothing. onnxruntime's MLAS picks
a MatMulNBits kernel by the CPU's ISA at start-up (AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI), quantizes the
activations to int8 per block (as llama.cpp's Q8 activations) and reads the packed weights once: a
3072x576 one-row product measured 47-51 us against fp32's 113-343 us, and 512 rows ran at fp32's rate.

Formats:
- 4 bits, asymmetric (Q4_1's scheme): w = low + scale * q, q in 0..15, per group of 32. MatMulNBits takes
  an integer zero point only (a float one falls back to a dequantizing path 10x slower), so the kernel runs
  with its default zero point 8 and the rest, (low + 8 * scale) * (the group's sum of x), is added by a small
  fp32 matmul in the same graph. A Q4_1 GGUF's weights are reproduced exactly: its blocks are min/max groups.
- 8 bits, symmetric (Q8_0's scheme): w = scale * q, q in -127..127, stored +128 against the default zero
  point 128. A Q8_0 tensor is reproduced exactly.

Only decode-sized products take that kernel. From DENSE_FROM_ROWS rows on (prefill chunks) a layer keeps
the dense fp32 weight through oneDNN: prefill is compute-bound, so 4 bits buy it nothing, and MatMulNBits
ran with torch's parallel ops between its calls at 0.7x fp32's prefill rate (2,048 tokens) because two
thread pools then share two cores. Prefill stays exact; the price is memory (fp32 beside the packed codes).

All sessions share one onnxruntime thread pool (one per session made 121 pools of spinning threads on two
cores: 1.4 s a token), sized to torch's thread count when the first layer is built. While it computes a
decode step torch runs on one thread (`decode_threads`): torch's own ops there are small, and its idle
OpenMP threads spinning beside onnxruntime's pool had made int4 decode slower than fp32 (66 vs 45 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .linear import Linear  # linear.py builds these layers: a runtime import would be circular

GROUP = 32
DENSE_FROM_ROWS = 64  # one-row to 32-row products ran 1.8-3x faster in 4 bits; 128 rows tied (bench/NOTES.md)
_pool_lock = threading.Lock()
_pool_threads: int | None = None


def _shared_pool(threads: int) -> int:
    """Size onnxruntime's process-wide thread pool once (it can only be set before its first session)."""
    global _pool_threads
    import onnxruntime

    with _pool_lock:
        if _pool_threads is None:
            onnxruntime.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
            _pool_threads = threads
        return _pool_threads


def _quantize(weight: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """weight [out, in] fp32 -> (codes [out, in] uint8, scales [out, G], group offsets [out, G] or None)."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // GROUP, GROUP).double()  # [out, G, 32]
    if bits == 4:
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # [out, G]
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        offsets = (low + 8 * scale).float().numpy()  # what the kernel's zero point 8 leaves out, per group
    else:
        scale = (groups.abs().amax(dim=2) / 127.0).clamp(min=1e-12)  # [out, G]
        codes = torch.round(groups / scale[..., None]).clamp(-127, 127) + 128
        offsets = None
    codes_u8 = codes.to(torch.uint8).reshape(out_features, in_features).numpy()
    return codes_u8, scale.float().numpy(), offsets


def _graph(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = codes.shape
    groups = in_features // GROUP
    if bits == 4:  # two codes a byte, the first in the low nibble
        blobs = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(out_features, groups, GROUP // 2)
    else:
        blobs = codes.reshape(out_features, groups, GROUP)
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(blobs), "B"),
        numpy_helper.from_array(scales.reshape(-1), "scales"),
    ]
    matmul_out = "Y" if offsets is None else "Yq"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["A", "B", "scales"],
            [matmul_out],
            domain="com.microsoft",
            K=in_features,
            N=out_features,
            bits=bits,
            block_size=GROUP,
            accuracy_level=4,
        )
    ]  # 4: int8 activations, the fast path
    if offsets is not None:
        initializers += [
            numpy_helper.from_array(np.array([0, groups, GROUP], np.int64), "group_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
            numpy_helper.from_array(np.ascontiguousarray(offsets.T), "offsets"),
        ]  # [G, out]
        nodes += [
            helper.make_node("Reshape", ["A", "group_shape"], ["A_groups"]),  # [M, G, 32]
            helper.make_node("ReduceSum", ["A_groups", "last_axis"], ["A_sums"], keepdims=0),  # [M, G]
            helper.make_node("MatMul", ["A_sums", "offsets"], ["Y_offset"]),  # [M, out]
            helper.make_node("Add", [matmul_out, "Y_offset"], ["Y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "block_quant_linear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", out_features])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


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
        import onnxruntime

        out_features, in_features = weight.shape
        if bits not in (4, 8):
            raise ValueError(f"block-quantized weights are 4 or 8 bits, got {bits}")
        if in_features % GROUP:
            raise ValueError(f"{bits}-bit weights need in_features divisible by {GROUP}, got {in_features}")
        self.out_features, self.in_features, self.bits = out_features, in_features, bits
        self.dense = dense  # the same weight in fp32, for products of DENSE_FROM_ROWS rows or more
        codes, scales, offsets = _quantize(weight.float(), bits)
        # what a decode step reads: the packed codes, fp32 scales and (4-bit) fp32 offsets
        self.weight_bytes = codes.size * bits // 8 + scales.nbytes + (0 if offsets is None else offsets.nbytes)
        _shared_pool(torch.get_num_threads())
        options = onnxruntime.SessionOptions()
        options.use_per_session_threads = False
        self._session = onnxruntime.InferenceSession(
            _graph(codes, scales, offsets, bits), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        if x.shape[0] >= DENSE_FROM_ROWS:
            return self.dense(x)
        x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        binding = self._session.io_binding()  # in and out in torch's memory: no copies
        binding.bind_input("A", "cpu", 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.data_ptr())
        self._session.run_with_iobinding(binding)
        return y
