"""What several benchmarks share: progress lines, the machine's description, the model setup, and timed
forwards and logits comparisons on a bare LlamaModel (engine_bench's measurements; cuda_check repeats them)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.kv_slots import KVSlots
from kvmesh.workers.linear import WeightFormat
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_files import RawModel, load_raw_model

from . import floors

Json = dict[str, Any]

# Real text for the logits comparison: quantization error shows on natural tokens, not random ids.
SAMPLE_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern and a small "
    "notebook in which he recorded the weather, the ships that passed, and the colour of the sea. Over forty "
    "years the notebooks filled three shelves. When the light was automated, the harbour museum asked for "
    "them, and a historian spent a winter reading every page. She found storms that no official record "
    "mentioned, a whale that visited the bay each spring, and, in the margins, sketches of birds drawn with "
    "great care. Her book about the keeper became a quiet success, read mostly by people who live near the "
    "coast and know how long a winter night can be."
)

_started = time.perf_counter()


def restart_clock() -> float:
    """Stamp log's lines from now on (a run's start); returns now."""
    global _started
    _started = time.perf_counter()
    return _started


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


def random_ids(count: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed))


def target_entry(value: float | None, target: float, at_least: bool, note: str) -> Json:
    """One of a benchmark's targets: its measured value against the bound (pass None: not measured)."""
    passed = None if value is None else (value >= target if at_least else value <= target)
    return {"value": value, "target": target, "direction": ">=" if at_least else "<=", "pass": passed, "note": note}


def print_targets(targets: Json) -> None:
    print("\ntargets:")
    for name, t in targets.items():
        status = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {status:4}  {name}: {value} (target {t['direction']} {t['target']}) - {t['note']}")


# -- setup ------------------------------------------------------------------------------------------
@dataclass
class Setup:
    raw: RawModel
    model: LlamaModel
    device: torch.device
    dtype: torch.dtype


def build_model(raw: RawModel, device: torch.device, dtype: torch.dtype, fmt: WeightFormat) -> LlamaModel:
    return LlamaModel(raw.config, raw.weights, device=device, dtype=dtype, weight_format=fmt)


def load_setup(args: argparse.Namespace) -> Setup:
    # The same defaults as Engine.load: fp32 on CPU, bf16 on CUDA.
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    fmt: WeightFormat = getattr(args, "weights", None) or ("bf16" if on_gpu else "fp32")
    log(f"loading {args.model} ({fmt} weights on {device})")
    raw = load_raw_model(args.model)
    return Setup(raw, build_model(raw, device, dtype, fmt), device, dtype)


# the CPU features the engine's kernels (oneDNN, PyTorch's int8/int4, llama.cpp's) choose their paths by
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine_info(device: torch.device) -> Json:
    cpu_model = platform.processor()
    flags: set[str] = set()
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
        flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model,
        "isa": [flag for flag in ISA_FLAGS if flag in flags],  # as /proc/cpuinfo lists them
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg()[0],
        # OpenMP settings change how 2 threads behave when other processes share the cores
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
    }


# -- the model's forwards ---------------------------------------------------------------------------
def timed_prefill(model: LlamaModel, ids: torch.Tensor, spare: int) -> tuple[float, KVCache]:
    """Seconds for one prefill into a fresh cache (last token's logits), and the cache it filled."""
    cache = model.new_cache(capacity=ids.numel() + spare)
    start = time.perf_counter()
    model.forward(ForwardBatch.single(cache, ids))
    floors.sync(model.device)
    return time.perf_counter() - start, cache


def decode_ms(model: LlamaModel, cache: KVCache, context: int, tokens: int) -> float:
    """Median ms of single-token forwards after `context` cached tokens (the cache is cut back first)."""
    cache.truncate(context)
    ids = random_ids(tokens + 1, model.config.vocab_size, seed=context)
    times = []
    for i, token in enumerate(ids.tolist()):
        start = time.perf_counter()
        model.forward(ForwardBatch.single(cache, [token]))
        floors.sync(model.device)
        if i:  # the first step after a prefill or a model switch is a warm-up
            times.append(time.perf_counter() - start)
    cache.truncate(context)
    return 1000 * statistics.median(times)


def median_spread(values: list[float]) -> tuple[float, float]:
    """A repeated figure's median and spread, (max - min) / median: how far the repeats disagree."""
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median


@dataclass(frozen=True)
class Settled:
    """A figure measured in blocks until two blocks in a row agree (an unsettled machine or a cold cache shows
    as blocks that keep moving): the last block's value, how far it was from the one before, and how many ran."""

    value: float
    spread: float  # (max - min) / median of the last two blocks, as llama_cpp_engine's spreads over rounds
    blocks: int


def settle(measure: Callable[[], float], tolerance: float = 0.05, max_blocks: int = 4) -> Settled:
    """Repeat `measure` (itself a median over a block) until two consecutive results differ by <= tolerance."""
    if not 0 < tolerance < 1 or max_blocks < 2:
        raise ValueError(f"settle needs 0 < tolerance < 1 and max_blocks >= 2, got {tolerance}, {max_blocks}")
    previous, blocks = measure(), 1
    while True:
        current = measure()
        blocks += 1
        spread = abs(current - previous) / statistics.median((current, previous))
        if spread <= tolerance or blocks == max_blocks:
            return Settled(current, spread, blocks)
        previous = current


def batch_decode_step(model: LlamaModel, caches: list[KVCache], token: int) -> float:
    """Seconds for one forward in which every cache's sequence decodes one token."""
    n = len(caches)
    batch = ForwardBatch(
        token_ids=torch.full((n,), token),
        positions=torch.tensor([c.length for c in caches]),
        chunks=[SequenceChunk(c, 1) for c in caches],
        logit_rows=torch.arange(n),
    )
    start = time.perf_counter()
    model.forward(batch)
    floors.sync(model.device)
    return time.perf_counter() - start


def slot_caches(model: LlamaModel, n: int, capacity: int) -> list[KVCache]:
    """N empty caches in one KVSlots buffer: the layout the engine decodes batches in."""
    c = model.config
    slots = KVSlots(
        num_layers=c.num_layers,
        num_slots=n,
        num_kv_heads=c.num_kv_heads,
        capacity=capacity,
        head_dim=c.head_dim,
        dtype=model.dtype,
        device=model.device,
    )
    return [cache for cache in (slots.acquire() for _ in range(n)) if cache is not None]


# -- logits -----------------------------------------------------------------------------------------
def logits_distance(reference: torch.Tensor, other: torch.Tensor) -> Json:
    """reference/other [T, V] logits of the same prompt: max |diff|, argmax agreement, mean KL(ref || other)."""
    log_p, log_q = F.log_softmax(reference.double(), -1), F.log_softmax(other.double(), -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q) per position
    return {
        "max_abs_logit_diff": float((reference - other).abs().max()),
        "argmax_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def all_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    logits = model.forward(ForwardBatch.single(model.new_cache(capacity=len(ids)), ids, all_logits=True))
    assert logits is not None
    return logits.float().cpu()


def decode_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """[T, V] logits of `ids` fed one token a forward: the path generated tokens take, whose kernels can
    differ from a prompt's (quantized formats run prefill-sized products in fp32)."""
    cache = model.new_cache(capacity=len(ids))
    rows = [model.forward(ForwardBatch.single(cache, [token])) for token in ids]
    assert all(row is not None for row in rows)
    return torch.cat(rows).float().cpu()  # type: ignore[arg-type]
