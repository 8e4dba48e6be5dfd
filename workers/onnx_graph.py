"""Small onnxruntime graphs over a model's weights, built in code and run on torch's memory.

Decode-sized work runs as onnxruntime graphs: the quantized formats' linears and layers (block_quant_linear.py,
quantized_layer.py; MatMulNBits is the kernel they came for) and every format's decode step on CPU
(step_graph.py). Inside one graph the ops between the matmuls (RMSNorm, SwiGLU, residual adds) cost ~1-2 us
each instead of torch's 10-40 us per op here.

Calls go through onnxruntime's bound-buffer API on pointers into torch tensors (no copies) and skip its
Python wrapper, which spent ~10 us a call validating bindings: 9.3 vs 19-25 us for a one-op graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GROUP = 32  # weights are quantized in groups of 32 along the input dimension (GGUF's Q4_1 / Q8_0 blocks)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output of any rank and type (a KV cache [1, heads, capacity, D], int32 lengths): its
    dims, ints or symbolic names, and numpy dtype. Its tensor is always the caller's (see OrtGraph.run)."""

    dims: tuple[int | str, ...]
    dtype: type = np.float32


# A tensor's shape: a width alone is an fp32 [rows, width] with the graph's shared row count "M" (the tokens of
# the step); (name, width) names another symbolic row count; (n, width) fixes it; a TensorSpec says it all.
Shape = int | tuple[str | int, int] | TensorSpec
_ONNX_TYPES = {np.float32: 1, np.int32: 6, np.int64: 7, np.bool_: 9}  # onnx.TensorProto's FLOAT, INT32, INT64, BOOL
_NUMPY_TYPES = {torch.float32: np.float32, torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_}
_pool_lock = threading.Lock()
_pool_threads: int | None = None
_copies_initializers: bool | None = None  # see _copies_external_initializers


@dataclass(frozen=True)
class QuantizedWeight:
    """A [out, in] weight in groups of 32 along `in`: codes [out, in] uint8, scales [out, G] and, for the
    asymmetric 4-bit scheme, the offsets (low + 8 * scale) [out, G] that the kernel's zero point 8 leaves out."""

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int

    @property
    def nbytes(self) -> int:
        """What one product reads: the packed codes, fp32 scales and (4-bit) fp32 offsets."""
        offsets = 0 if self.offsets is None else self.offsets.nbytes
        return self.codes.size * self.bits // 8 + self.scales.nbytes + offsets

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclass(frozen=True)
class DenseWeight:
    """A [out, in] fp32 weight, multiplied as it is (onnxruntime packs it once for its SGEMM at load)."""

    matrix: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes

    @property
    def out_features(self) -> int:
        return self.matrix.shape[0]


GraphWeight = QuantizedWeight | DenseWeight


def quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """weight [out, in] fp32 -> 4-bit asymmetric (Q4_1's scheme) or 8-bit symmetric (Q8_0's) groups of 32.

    A GGUF's own Q4_1 / Q8_0 tensor comes back exactly: llama.cpp's quantizer puts a Q4_1 group's min and max
    at codes 0 and 15 and a Q8_0 group's largest magnitude at 127, which is how the groups are found here.
    """
    out_features, in_features = weight.shape
    if bits not in (4, 8):
        raise ValueError(f"block-quantized weights are 4 or 8 bits, got {bits}")
    if in_features % GROUP:
        raise ValueError(f"{bits}-bit weights need in_features divisible by {GROUP}, got {in_features}")
    groups = weight.reshape(out_features, in_features // GROUP, GROUP).double()  # [out, G, 32]
    if bits == 4:
        low, high = groups.amin(dim=2), groups.amax(dim=2)  # [out, G]
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        offsets = (low + 8 * scale).float().numpy()
    else:
        scale = (groups.abs().amax(dim=2) / 127.0).clamp(min=1e-12)  # [out, G]
        codes = torch.round(groups / scale[..., None]).clamp(-127, 127) + 128  # the kernel's zero point: 128
        offsets = None
    codes_u8 = codes.to(torch.uint8).reshape(out_features, in_features).numpy()
    return QuantizedWeight(codes_u8, scale.float().numpy(), offsets, bits)


class GraphBuilder:
    """Accumulates nodes and initializers; names are scoped by a prefix per call site."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        # large weights stay out of the serialized model (protobuf took 4 s for SmolLM2's 540 MB): the model
        # declares them external and onnxruntime reads them from these arrays (OrtGraph)
        self.external: dict[str, np.ndarray] = {}
        self._constants: set[str] = set()

    def rotary(self, x: str, cos: str, sin: str, heads: int, head_dim: int, name: str) -> str:
        """RoPE in HF's rotate_half layout, as kvcomm/rope.py's `rotate`: x [M, heads * D], cos/sin [M, D]."""
        split = self.constant(f"{name}.halves", np.array([head_dim // 2, head_dim // 2], np.int64))
        per_head = self.constant(f"{name}.per_head", np.array([0, heads, head_dim], np.int64))
        flat = self.constant(f"{name}.flat", np.array([0, heads * head_dim], np.int64))
        axis = self.constant(f"{name}.head_axis", np.array([1], np.int64))
        self.node("Reshape", [x, per_head], [f"{name}.heads"])  # [M, H, D]
        self.node("Split", [f"{name}.heads", split], [f"{name}.first", f"{name}.second"], axis=-1)
        self.node("Neg", [f"{name}.second"], [f"{name}.minus_second"])
        self.node("Concat", [f"{name}.minus_second", f"{name}.first"], [f"{name}.rotated_half"], axis=-1)
        self.node("Unsqueeze", [cos, axis], [f"{name}.cos"])  # [M, 1, D]
        self.node("Unsqueeze", [sin, axis], [f"{name}.sin"])
        self.node("Mul", [f"{name}.heads", f"{name}.cos"], [f"{name}.x_cos"])
        self.node("Mul", [f"{name}.rotated_half", f"{name}.sin"], [f"{name}.half_sin"])
        self.node("Add", [f"{name}.x_cos", f"{name}.half_sin"], [f"{name}.rotated"])
        self.node("Reshape", [f"{name}.rotated", flat], [f"{name}.out"])
        return f"{name}.out"

    def constant(self, name: str, array: np.ndarray) -> str:
        """A constant; one already made under this name is that one (an If's two branches build the same layers)."""
        if self._declare(name):
            self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _declare(self, name: str) -> bool:
        """Whether `name` is a new constant (then it is recorded)."""
        new = name not in self._constants
        self._constants.add(name)
        return new

    def external_constant(self, name: str, array: np.ndarray) -> str:
        """A constant the graph reads from `array` (fp32, contiguous) rather than from its own bytes."""
        from onnx import TensorProto

        if not self._declare(name):
            return name
        declared = TensorProto(name=name, data_type=_ONNX_TYPES[np.float32], dims=array.shape)
        declared.data_location = TensorProto.EXTERNAL
        declared.external_data.add(key="location", value="kvmesh-in-memory")  # never read: OrtGraph supplies it
        self.initializers.append(declared)
        self.external[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    def branch(self, name: str, build: Callable[[], list[str]]) -> Any:
        """A subgraph (an If's branch) of the nodes `build` adds, whose outputs are the fp32 values it returns
        the names of. Constants it makes stay the enclosing graph's, read from the enclosing scope."""
        enclosing, self.nodes = self.nodes, []
        try:
            outputs = build()
            nodes = self.nodes
        finally:
            self.nodes = enclosing
        values = [self._helper.make_tensor_value_info(output, _ONNX_TYPES[np.float32], None) for output in outputs]
        return self._helper.make_graph(nodes, name, [], values)

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes) -> None:
        self.nodes.append(self._helper.make_node(op, inputs, outputs, domain=domain, **attributes))

    def matmul(self, x: str, weight: GraphWeight, out: str, name: str) -> str:
        """out [M, N] = x [M, K] @ weight.T: a dense weight through Gemm (transposed in the op: no copy of
        it here), a quantized one through MatMulNBits with int8 activations plus the 4-bit offsets term."""
        if isinstance(weight, DenseWeight):
            self.node("Gemm", [x, self.external_constant(f"{name}.weight", weight.matrix)], [out], transB=1)
            return out
        n, k = weight.codes.shape
        groups = k // GROUP
        if weight.bits == 4:  # two codes a byte, the first in the low nibble
            blobs = (weight.codes[:, 0::2] | (weight.codes[:, 1::2] << 4)).reshape(n, groups, GROUP // 2)
        else:
            blobs = weight.codes.reshape(n, groups, GROUP)
        blob, scales = self.constant(f"{name}.codes", blobs), self.constant(f"{name}.scales", weight.scales.reshape(-1))
        quantized_out = out if weight.offsets is None else f"{name}.quantized"
        # accuracy_level 4: int8 activations, the fast path on every x86 ISA MLAS has kernels for
        self.node(
            "MatMulNBits",
            [x, blob, scales],
            [quantized_out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=weight.bits,
            block_size=GROUP,
            accuracy_level=4,
        )
        if weight.offsets is not None:  # + (each group's sum of x) @ offsets: [M, G] @ [G, N]
            shape = self.constant(f"{name}.group_shape", np.array([0, groups, GROUP], np.int64))
            axis = self.constant(f"{name}.last_axis", np.array([-1], np.int64))
            offsets = self.constant(f"{name}.offsets", weight.offsets.T)
            self.node("Reshape", [x, shape], [f"{name}.groups"])  # [M, G, 32]
            self.node("ReduceSum", [f"{name}.groups", axis], [f"{name}.sums"], keepdims=0)  # [M, G]
            self.node("MatMul", [f"{name}.sums", offsets], [f"{name}.offset_term"])
            self.node("Add", [quantized_out, f"{name}.offset_term"], [out])
        return out

    def build(self, inputs: dict[str, Shape], outputs: dict[str, Shape]) -> bytes:
        """The model's bytes: its inputs and outputs by name (see Shape)."""
        h = self._helper

        def info(name: str, shape: Shape):
            if isinstance(shape, TensorSpec):
                return h.make_tensor_value_info(name, _ONNX_TYPES[shape.dtype], list(shape.dims))
            rows, width = shape if isinstance(shape, tuple) else ("M", shape)
            return h.make_tensor_value_info(name, _ONNX_TYPES[np.float32], [rows, width])

        graph = h.make_graph(
            self.nodes,
            "kvmesh",
            [info(name, shape) for name, shape in inputs.items()],
            [info(name, shape) for name, shape in outputs.items()],
            self.initializers,
        )
        opsets = [h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]
        return h.make_model(graph, opset_imports=opsets).SerializeToString()


def _shared_pool(threads: int) -> None:
    """Size onnxruntime's process-wide thread pool once (it can only be set before its first session).

    One pool for every graph: one per session made 121 pools of spinning threads on two cores (1.4 s a token).
    """
    global _pool_threads
    from onnxruntime.capi import _pybind_state

    with _pool_lock:
        if _pool_threads is None:
            _pybind_state.set_global_thread_pool_sizes(threads, 1)
            _pool_threads = threads


def _session(model: bytes, external: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """An onnxruntime session on the process-wide pool, its external constants read from `external`'s arrays
    -> the session and the OrtValues over those arrays (alive as long as the caller keeps them)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.use_per_session_threads = False
    values = [onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in external.values()]
    if values:
        options.add_external_initializers(list(external), values)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"]), values


def _copies_external_initializers() -> bool:
    """Whether this onnxruntime copies external initializers at load, probed once: a 1 MB weight's array is
    zeroed after its session is made, and the product must not change."""
    global _copies_initializers
    with _pool_lock:
        if _copies_initializers is None:
            rng = np.random.default_rng(0)
            weight, x = rng.standard_normal((512, 512), np.float32), rng.standard_normal((1, 512), np.float32)
            g = GraphBuilder()
            g.matmul("x", DenseWeight(weight), "y", name="probe")
            session, _ = _session(g.build({"x": 512}, {"y": 512}), g.external)
            before = session.run(None, {"x": x})[0]
            g.external["probe.weight"][:] = 0
            _copies_initializers = bool(np.array_equal(session.run(None, {"x": x})[0], before))
        return _copies_initializers


class OrtGraph:
    """A built graph as an onnxruntime session that reads and writes torch tensors in place."""

    def __init__(self, model: bytes, outputs: dict[str, Shape], external: dict[str, np.ndarray] | None = None) -> None:
        """`external`: the builder's external constants by name (GraphBuilder.external)."""
        from onnxruntime.capi import _pybind_state

        _shared_pool(torch.get_num_threads())
        self._session, values = _session(model, external or {})
        # the arrays live as long as the session unless onnxruntime copied them at load (it does today: ~430 MB
        # of SmolLM2's fp32 weights are then freed)
        self._external = [] if not values or _copies_external_initializers() else values
        self._outputs = outputs
        self._binding = _pybind_state.SessionIOBinding(self._session._sess)
        self._cpu = _pybind_state.OrtDevice(_pybind_state.OrtDevice.cpu(), _pybind_state.OrtDevice.default_memory(), 0)
        self._lock = threading.Lock()  # one binding per graph: calls from two threads take turns
        self._nowhere = torch.zeros(1, dtype=torch.int64)  # what an empty tensor points at: onnxruntime refuses 0
        # name -> (address, shape, dtype) bound last: a binding outlives the run, so an unchanged one (a KV buffer
        # decoding step after step) is not made again (~2 us each; the step graph has ~250)
        self._bound: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Inputs by name -> the outputs, fresh tensors, in declaration order."""
        return self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor], into: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Inputs by name (fp32, int32 or int64; the first one's rows are "M") -> the outputs in declaration
        order: those named in `into` are written there, in place (a KV cache an op reads and extends), the
        others into fresh fp32 tensors."""
        into = into or {}
        rows = next(iter(inputs.values())).shape[0]
        kept = [x if x.dtype in _NUMPY_TYPES else x.to(torch.float32) for x in inputs.values()]
        kept = [x.contiguous() for x in kept]  # alive until the run returns
        outputs = [
            into[name] if name in into else torch.empty(*_rows_width(shape, rows), dtype=torch.float32)
            for name, shape in self._outputs.items()
        ]
        with self._lock:
            for name, x in zip(inputs, kept, strict=True):
                if self._rebind(name, x):
                    self._binding.bind_input(name, self._cpu, _NUMPY_TYPES[x.dtype], list(x.shape), self._address(x))
            for name, y in zip(self._outputs, outputs, strict=True):
                if not y.is_contiguous() or y.dtype != torch.float32:
                    raise ValueError(f"output {name!r} must be a contiguous fp32 tensor, got {y.dtype} {y.stride()}")
                if self._rebind(name, y):
                    self._binding.bind_output(name, self._cpu, np.float32, list(y.shape), self._address(y))
            self._session._sess.run_with_iobinding(self._binding, None)
        return outputs

    def _address(self, x: torch.Tensor) -> int:
        return x.data_ptr() or self._nowhere.data_ptr()

    def _rebind(self, name: str, x: torch.Tensor) -> bool:
        """Whether `name` must be bound to x: not bound yet, or last to other memory, shape or type."""
        key = (self._address(x), tuple(x.shape), x.dtype)
        if self._bound.get(name) == key:
            return False
        self._bound[name] = key
        return True


def _rows_width(shape: Shape, rows: int) -> tuple[int, int]:
    if isinstance(shape, TensorSpec):
        raise ValueError(f"an output declared as {shape} is written into the caller's tensor: pass it in `into`")
    if isinstance(shape, int):
        return rows, shape
    fixed, width = shape
    if not isinstance(fixed, int):
        raise ValueError(f"an output's rows must be M or a number, got {fixed!r}")
    return fixed, width
