"""Physical floors: what this machine can do at best, and what one token of a model costs.

A benchmark figure means little alone on a shared, noisy 2-core machine; beside the floor measured in the
same run it says how far from the hardware limit the code is. Floors here:

- matmul rate (GFLOP/s): a square `torch.mm` and a prefill-shaped `F.linear`; prefill is compute bound;
- copy bandwidth (GB/s, read + write counted): the bound for streaming weights once per decode token;
- read bandwidth (GB/s, a `sum` over a large buffer): a pure read stream, which is what a decode step is;
- GEMV rate (GB/s of weight streamed by `x @ W`): what a single-token matmul actually reaches, usually
  well under copy bandwidth on CPUs;
- per-token cost of a model: FLOPs (from its config) and bytes of weights a decode token reads.

`CpuMonitor` measures how busy the *other* processes kept the CPUs: with 2 threads on 2 cores, one
other busy process can stall every parallel op at its barrier, so a figure taken under load is suspect.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_config import ModelConfig


@dataclass(frozen=True)
class Floors:
    matmul_gflops: float  # square torch.mm
    linear_gflops: float  # prefill-shaped F.linear
    bandwidth_gbs: float  # copy_, read + write counted
    read_gbs: float  # sum over a large buffer: read only
    gemv_gbs: float  # weight bytes per second through x @ W with one row of x

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class FloorSizes:
    mm_n: int = 2048
    linear_mkn: tuple[int, int, int] = (1024, 576, 3072)
    # Per buffer, far beyond the 32 MiB L3 so DRAM is measured. In this VM the rate depends on where a
    # buffer lands (35 vs 55 GB/s across sizes and runs), so several sizes are tried and the best kept.
    copy_bytes: tuple[int, ...] = (256 << 20, 1 << 30)
    gemv_kn: tuple[int, int] = (8192, 8192)  # 256 MiB of fp32 weight
    repeats: int = 3


QUICK_SIZES = FloorSizes(mm_n=1024, copy_bytes=(128 << 20,), gemv_kn=(4096, 8192), repeats=2)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- machine floors ---------------------------------------------------------------------------------
def matmul_gflops(n: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / seconds / 1e9


def linear_gflops(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 3
) -> float:
    """x [m, k] through a [n, k] weight: the shape of a prefill's MLP projection."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    seconds = median_seconds(lambda: F.linear(x, w), device, repeats)
    return 2 * m * k * n / seconds / 1e9


def copy_bandwidth_gbs(nbytes: int, device: torch.device, repeats: int = 3) -> float:
    src = torch.ones(nbytes // 4, device=device)  # filled, so every page is mapped before timing
    dst = torch.zeros_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds / 1e9


def read_bandwidth_gbs(nbytes: int, device: torch.device, repeats: int = 3) -> float:
    src = torch.ones(nbytes // 4, device=device)
    seconds = median_seconds(lambda: src.sum(), device, repeats)
    return nbytes / seconds / 1e9


def gemv_gbs(k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """One row through a [k, n] weight laid out [in, out], as the engine's DenseLinear stores it."""
    x = torch.randn(1, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(x, w), device, repeats)
    return w.numel() * w.element_size() / seconds / 1e9


def measure_floors(device: torch.device, dtype: torch.dtype = torch.float32, sizes: FloorSizes | None = None) -> Floors:
    sizes = sizes or FloorSizes()
    m, k, n = sizes.linear_mkn
    return Floors(
        matmul_gflops=matmul_gflops(sizes.mm_n, device, dtype, sizes.repeats),
        linear_gflops=linear_gflops(m, k, n, device, dtype, sizes.repeats),
        bandwidth_gbs=max(copy_bandwidth_gbs(n, device, sizes.repeats) for n in sizes.copy_bytes),
        read_gbs=max(read_bandwidth_gbs(n, device, sizes.repeats) for n in sizes.copy_bytes),
        gemv_gbs=gemv_gbs(*sizes.gemv_kn, device, dtype, sizes.repeats),
    )


# -- what a token of a model costs ------------------------------------------------------------------
def layer_params(config: ModelConfig) -> int:
    """Weights in the decoder layers' matmuls (q, k, v, o, gate, up, down), all layers."""
    d, ffn = config.hidden_size, config.intermediate_size
    attention = d * (config.q_size + 2 * config.kv_size) + config.q_size * d
    return config.num_layers * (attention + 3 * d * ffn)


def attention_flops(config: ModelConfig, keys: int) -> float:
    """Q·K and P·V of one token attending over `keys` cached tokens, all heads and layers."""
    return 2 * 2 * config.num_layers * config.q_size * keys


def head_flops(config: ModelConfig) -> float:
    return 2 * config.vocab_size * config.hidden_size


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """A prompt of `tokens` into an empty cache, logits for its last token only (causal: token i sees i + 1)."""
    causal_keys = tokens * (tokens + 1) // 2
    return 2 * layer_params(config) * tokens + attention_flops(config, causal_keys) + head_flops(config)


def decode_flops(config: ModelConfig, context: int) -> float:
    """One new token after `context` cached ones, with its logits."""
    return 2 * layer_params(config) + attention_flops(config, context + 1) + head_flops(config)


def decode_weight_bytes(model: LlamaModel) -> int:
    """Bytes of weights one decode step reads: every layer's matmuls and norms, the final norm and the LM head.

    The embedding table is left out: a step reads one row of it. Counted from each linear layer's `weight_bytes`,
    so it is right for any weight format (packed codes plus their scales, and so on).
    """
    total = model.lm_head.weight_bytes + model.final_norm.numel() * model.final_norm.element_size()
    return total + sum(layer.decode_weight_bytes() for layer in model.layers)


# -- how busy the rest of the machine is ------------------------------------------------------------
class CpuMonitor:
    """CPU time used by other processes since the last `lap()`, as a fraction of all cores (Linux)."""

    def __init__(self) -> None:
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(all processes' busy CPU seconds, this process's CPU seconds, wall seconds), or None off Linux."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def lap(self) -> float | None:
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[2] <= last[2]:
            return None
        others = (now[0] - last[0]) - (now[1] - last[1])
        return max(0.0, others / ((now[2] - last[2]) * (os.cpu_count() or 1)))
