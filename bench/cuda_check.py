"""`python -m kvmesh.bench.cuda_check`: the engine's CUDA path in one short run: numerics, transformers, speed.

The engine was developed on CPU only; this check is written for a short slot on a GPU machine. Every
section is timed and guarded: one that fails leaves its traceback in the JSON and the log, and the others
still run. The JSON is rewritten after each section, so a run cut short by a timeout keeps what it measured.

Sections, in order:
- env: torch, CUDA, the GPU, fp32 matmul precision and SDPA backends;
- floors: copy/read bandwidth and the matmul rate in the speed dtype (bench/floors.py);
- numerics (needs --model): the model in fp32 on the CPU (the reference) against fp32 and bf16 on the
  device: logits over natural text (max |diff|, argmax agreement, KL) and greedy generation through Engine;
- vs_transformers:<shape>: random weights, the same tensors in kvmesh's LlamaModel and in transformers'
  LlamaForCausalLM on the device; logits in fp32 and in bf16;
- speed:<shape> ("model" is the --model file): prefill tok/s, decode ms/token at batch 1 and tok/s at
  batch 8 in the engine's default dtype (bf16 on CUDA), transformers interleaved round by round, decode
  against its weight-streaming floor; batch-8 decode through Engine.step where a tokenizer exists.

On the CPU the speed plan is always the quick one: it is there to test this code, not to measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub; set before transformers loads

import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeSpec
from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.linear import WeightFormat, make_linear
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_config import ModelConfig
from kvmesh.workers.model_files import RawModel, load_raw_model
from kvmesh.workers.sampling import SamplingParams

from . import engine_bench, floors
from .bench_common import (
    SAMPLE_TEXT,
    Setup,
    all_logits,
    batch_decode_step,
    decode_ms,
    log,
    logits_distance,
    machine_info,
    random_ids,
    slot_caches,
    timed_prefill,
)
from .json_report import save_json
from .random_llama import hf_llama_from_weights, random_llama_weights

Json = dict[str, Any]

CHAT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "Name three colors.")


# -- shapes -----------------------------------------------------------------------------------------
def llama_shape(
    name: str,
    *,
    vocab: int,
    hidden: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    theta: float,
    tied: bool,
    llama3_factor: float | None = None,
) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope=RopeSpec(head_dim=head_dim, theta=theta, scaling_factor=llama3_factor),
        rms_norm_eps=1e-5,
        max_context=8192,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_ids=(2,),
    )


@dataclass(frozen=True)
class Shape:
    config: ModelConfig
    vs_transformers: bool  # in the numerics-against-transformers section
    speed: bool  # in the speed section


SHAPES: dict[str, Shape] = {
    "tiny": Shape(
        llama_shape(
            "tiny", vocab=256, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16, theta=10000.0, tied=False
        ),
        vs_transformers=True,
        speed=True,
    ),
    # the bundled model's shape; its speed is measured on the real file (speed:model)
    "smollm2": Shape(
        llama_shape(
            "smollm2-135m-shape",
            vocab=49152,
            hidden=576,
            ffn=1536,
            layers=30,
            heads=9,
            kv_heads=3,
            head_dim=64,
            theta=100000.0,
            tied=True,
        ),
        vs_transformers=True,
        speed=False,
    ),
    "1b": Shape(
        llama_shape(
            "llama-3.2-1b-shape",
            vocab=128256,
            hidden=2048,
            ffn=8192,
            layers=16,
            heads=32,
            kv_heads=8,
            head_dim=64,
            theta=500000.0,
            tied=True,
            llama3_factor=32.0,
        ),
        vs_transformers=True,
        speed=True,
    ),
    # fp32 numerics at 8B would hold 2 x 32 GB of weights for little news over 1B: speed only
    "8b": Shape(
        llama_shape(
            "llama-3.1-8b-shape",
            vocab=128256,
            hidden=4096,
            ffn=14336,
            layers=32,
            heads=32,
            kv_heads=8,
            head_dim=128,
            theta=500000.0,
            tied=False,
            llama3_factor=8.0,
        ),
        vs_transformers=False,
        speed=True,
    ),
}
DEFAULT_SHAPES = ("smollm2", "1b", "8b")
CPU_MAX_BYTES = 2 << 30  # random shapes with more fp32 weight bytes are skipped on the CPU (2 CPU cores, shared RAM)


def param_count(config: ModelConfig) -> int:
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return floors.layer_params(config) + embeddings


# -- plans ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    logit_tokens: tuple[int, ...]  # natural-text prompt lengths for the logits comparison
    gen_tokens: int  # greedy tokens per chat prompt
    hf_tokens: int  # random-id prompt length for the comparison with transformers
    prefill_lengths: tuple[int, ...]
    decode_context: int
    decode_tokens: int  # timed decode steps per round (median)
    batch_size: int
    rounds: int  # interleaved ours / transformers rounds (median over rounds)
    engine_steps: int  # timed Engine.step batch decode steps
    floor_sizes: floors.FloorSizes = field(default_factory=floors.FloorSizes)


# Sized for ~2 minutes on an H200: every GPU figure here is milliseconds; loads and builds dominate.
FULL = Plan(
    logit_tokens=(128, 1024),
    gen_tokens=32,
    hf_tokens=256,
    prefill_lengths=(512, 2048),
    decode_context=512,
    decode_tokens=24,
    batch_size=8,
    rounds=3,
    engine_steps=16,
    # large enough that each timed op runs ~1 ms or more on an H200, so launch and sync costs vanish
    floor_sizes=floors.FloorSizes(
        mm_n=8192, linear_mkn=(2048, 4096, 14336), copy_bytes=(1 << 30, 4 << 30), gemv_kn=(32768, 16384), repeats=10
    ),
)
QUICK = Plan(
    logit_tokens=(64,),
    gen_tokens=16,
    hf_tokens=32,
    prefill_lengths=(64, 128),
    decode_context=64,
    decode_tokens=4,
    batch_size=8,
    rounds=1,
    engine_steps=3,
    floor_sizes=floors.QUICK_SIZES,
)


def speed_plan(plan: Plan, device: torch.device) -> Plan:
    """The CPU always gets the quick speed plan: there it tests this code, it does not measure the engine."""
    if device.type == "cuda":
        return plan
    return replace(
        plan,
        prefill_lengths=QUICK.prefill_lengths,
        decode_context=QUICK.decode_context,
        decode_tokens=QUICK.decode_tokens,
        rounds=QUICK.rounds,
        engine_steps=QUICK.engine_steps,
        floor_sizes=QUICK.floor_sizes,
    )


def default_dtype(device: torch.device) -> tuple[torch.dtype, WeightFormat]:
    """The engine's own default (Engine.load): bf16 on CUDA, fp32 on the CPU."""
    return (torch.bfloat16, "bf16") if device.type == "cuda" else (torch.float32, "fp32")


def bf16_unsupported(device: torch.device) -> str | None:
    """Why bf16 weights cannot run here, or None. CPU bf16 linears need oneDNN's bf16 (AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    try:
        make_linear(torch.ones(8, 8), "bf16", device)(torch.ones(1, 8, dtype=torch.bfloat16))
    except RuntimeError:
        return "bf16 linears fail on this CPU (oneDNN has no bf16 inner product here)"
    return None


# -- the run: sections, each guarded and timed ------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace, device: torch.device, plan: Plan) -> None:
        self.args = args
        self.device = device
        self.plan = plan
        self.started = time.perf_counter()
        self.results: Json = {
            "argv": sys.argv[1:],
            "device": str(device),
            "quick": bool(args.quick),
            "plan": asdict(plan),
            "sections": {},
        }
        self.current: str | None = None
        self._raw: RawModel | None = None

    def raw_model(self) -> RawModel:
        if self._raw is None:
            log(f"loading {self.args.model} (GGUF files are dequantized once, then cached)")
            self._raw = load_raw_model(self.args.model)
        return self._raw

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.started
        save_json(self.args.json_path, self.results, lambda _: None)

    def run(self, name: str, fn: Callable[[], Json]) -> None:
        status: Json = {"ok": False}
        if time.perf_counter() - self.started > self.args.deadline_s:
            status["skipped"] = f"past the {self.args.deadline_s:.0f} s deadline"
            log(f"== {name}: skipped ({status['skipped']})")
            self.results["sections"][name] = status
            self.save()
            return
        log(f"== {name}")
        self.current = name
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            self.results[name] = fn()
            status["ok"] = True
        except Exception as exc:  # one broken section costs no others
            status["error"] = traceback.format_exc()
            print(status["error"], file=sys.stderr, flush=True)
            log(f"== {name} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        status["elapsed_s"] = time.perf_counter() - start
        if self.device.type == "cuda":
            status["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.results["sections"][name] = status
        self.current = None
        gc.collect()  # the section's models go with its frame; give their memory back before the next
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()
        log(f"   {name}: {'ok' if status['ok'] else 'FAILED'} in {status['elapsed_s']:.1f} s")


def _guarded(fn: Callable[[], Json]) -> Json:
    """A part of a section that may fail alone (one dtype, one variant): its traceback in place of its figures."""
    try:
        return fn()
    except Exception as exc:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        log(f"   part failed: {type(exc).__name__}: {str(exc)[:300]}")
        return {"error": tb}


# -- env --------------------------------------------------------------------------------------------
def section_env(device: torch.device) -> Json:
    info = machine_info(device)
    info.update(
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        fp32_matmul_precision=torch.get_float32_matmul_precision(),
        allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    )
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as exc:
        info["transformers"] = f"missing: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            sdpa={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    log(f"   torch {torch.__version__} (CUDA {torch.version.cuda}), {info.get('gpu') or 'no GPU'}")
    return info


# -- floors -----------------------------------------------------------------------------------------
def section_floors(device: torch.device, plan: Plan) -> Json:
    dtype, _ = default_dtype(device)
    found = floors.measure_floors(device, dtype, plan.floor_sizes)
    log(
        f"   {dtype}: mm {found.matmul_gflops / 1e3:.1f} TFLOP/s, linear {found.linear_gflops / 1e3:.1f}, "
        f"copy {found.bandwidth_gbs:.0f} GB/s, read {found.read_gbs:.0f} GB/s, GEMV {found.gemv_gbs:.0f} GB/s"
    )
    return {"dtype": str(dtype), **found.as_dict()}


# -- numerics on the real model ---------------------------------------------------------------------
def _text_ids(raw: RawModel, length: int) -> list[int]:
    """Natural text of `length` tokens (the passage repeated as often as needed)."""
    one = raw.tokenizer.encode(SAMPLE_TEXT)
    return (one * (length // len(one) + 1))[:length]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _first_token_top2(model: LlamaModel, raw: RawModel) -> list[list[float]]:
    """Per chat prompt, the reference's two likeliest first tokens' probabilities: a near-tie there makes a
    bf16 reply differ from the first token on without anything being wrong."""
    engine = Engine(model, raw.tokenizer, EngineConfig(prefix_cache=None, speculation=None))
    rows = []
    for prompt in CHAT_PROMPTS:
        logits = model.forward(ForwardBatch.single(model.new_cache(), engine.chat_prompt(prompt)))
        assert logits is not None
        rows.append([round(float(p), 4) for p in logits[-1].softmax(-1).topk(2).values])
    return rows


def _greedy(model: LlamaModel, raw: RawModel, plan: Plan) -> Json:
    """The chat prompts through one Engine (default config: batching, prefix cache, speculation), greedy."""
    engine = Engine(model, raw.tokenizer)
    prompts = [engine.chat_prompt(p) for p in CHAT_PROMPTS]
    start = time.perf_counter()
    done = engine.generate(prompts, SamplingParams(max_tokens=plan.gen_tokens))
    return {
        "seconds": time.perf_counter() - start,
        "tokens": [c.token_ids for c in done],
        "texts": [c.text for c in done],
    }


def section_numerics(check: Check) -> Json:
    raw, plan, device = check.raw_model(), check.plan, check.device
    lengths = [n for n in plan.logit_tokens if n < raw.config.max_context]
    prompts = {str(n): _text_ids(raw, n) for n in lengths}
    log(f"   reference: fp32 on the CPU, logits over {lengths} tokens and {len(CHAT_PROMPTS)} greedy replies")
    reference = LlamaModel(raw.config, raw.weights)
    ref_logits = {n: all_logits(reference, ids) for n, ids in prompts.items()}
    ref_gen = _greedy(reference, raw, plan) | {"first_token_top2": _first_token_top2(reference, raw)}
    del reference
    result: Json = {
        "model": raw.config.name,
        "reference": {"device": "cpu", "dtype": "float32", **ref_gen},
        "logit_scale": {n: float(v.abs().max()) for n, v in ref_logits.items()},
    }
    variants: dict[str, tuple[torch.dtype, WeightFormat]] = {
        "device_fp32": (torch.float32, "fp32"),
        "device_bf16": (torch.bfloat16, "bf16"),
    }
    logits: dict[str, dict[str, torch.Tensor]] = {}
    for name, (dtype, fmt) in variants.items():
        reason = bf16_unsupported(device) if dtype == torch.bfloat16 else None
        if reason:
            result[name] = {"skipped": reason}
            continue

        def variant(dtype: torch.dtype = dtype, fmt: WeightFormat = fmt, name: str = name) -> Json:
            log(f"   {name}: {fmt} weights on {device}")
            model = LlamaModel(raw.config, raw.weights, device=device, dtype=dtype, weight_format=fmt)
            logits[name] = {n: all_logits(model, ids) for n, ids in prompts.items()}
            gen = _greedy(model, raw, plan)
            gen["common_prefix"] = [_common_prefix(a, b) for a, b in zip(ref_gen["tokens"], gen["tokens"], strict=True)]
            gen["same_text"] = [a == b for a, b in zip(ref_gen["texts"], gen["texts"], strict=True)]
            distances = {n: logits_distance(ref_logits[n], v) for n, v in logits[name].items()}
            log(
                f"   {name}: argmax agreement {[round(d['argmax_agreement'], 4) for d in distances.values()]}, "
                f"greedy common prefix {gen['common_prefix']}"
            )
            entry = {"logits_vs_cpu_fp32": distances}
            return {"dtype": str(dtype), **entry, "greedy": gen}

        result[name] = _guarded(variant)
    if len(logits) == 2:  # what bf16 costs on the device itself, kernels held equal
        result["device_bf16_vs_device_fp32"] = {
            n: logits_distance(logits["device_fp32"][n], logits["device_bf16"][n]) for n in prompts
        }
    return result


# -- against transformers, random weights -----------------------------------------------------------
def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _hf_logits(hf: Any, ids: list[int], device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids], device=device)).logits[0].float().cpu()


def section_vs_transformers(check: Check, config: ModelConfig) -> Json:
    device, plan = check.device, check.plan
    _transformers()
    ids = random_ids(plan.hf_tokens, config.vocab_size, seed=11).tolist()
    weights = random_llama_weights(config, seed=1, device=device)  # fp32: both dtypes are cast from it
    hf = hf_llama_from_weights(config, weights, device=device, dtype=torch.float32)
    hf_fp32 = _hf_logits(hf, ids, device)
    result: Json = {
        "tokens": len(ids),
        "logit_scale": float(hf_fp32.abs().max()),
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
    }

    def fp32() -> Json:
        ours = all_logits(LlamaModel(config, weights, device=device), ids)
        return {"ours_vs_hf": logits_distance(hf_fp32, ours)}

    result["fp32"] = _guarded(fp32)
    del hf
    reason = bf16_unsupported(device)
    # built in bf16 as from_pretrained(dtype=bf16) would, not cast with .to(): that would round RoPE's
    # inv_freq buffer to bf16 too, which transformers keeps in fp32
    hf_bf16 = _hf_logits(hf_llama_from_weights(config, weights, device=device, dtype=torch.bfloat16), ids, device)

    def bf16() -> Json:
        if reason:
            return {"skipped": reason, "hf_bf16_vs_hf_fp32": logits_distance(hf_fp32, hf_bf16)}
        model = LlamaModel(config, weights, device=device, dtype=torch.bfloat16, weight_format="bf16")
        ours = all_logits(model, ids)
        return {
            "ours_vs_hf": logits_distance(hf_bf16, ours),  # same dtype: how far apart the two codes are
            "ours_vs_hf_fp32": logits_distance(hf_fp32, ours),  # against the fp32 truth ...
            "hf_bf16_vs_hf_fp32": logits_distance(hf_fp32, hf_bf16),  # ... beside transformers' own bf16 error
        }

    result["bf16"] = _guarded(bf16)
    for dtype in ("fp32", "bf16"):
        d = result[dtype].get("ours_vs_hf")
        if d:
            log(
                f"   {dtype}: max |dlogit| {d['max_abs_logit_diff']:.3g} (scale {result['logit_scale']:.3g}), "
                f"argmax agreement {d['argmax_agreement']:.2%}"
            )
    return result


# -- speed ------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], object], device: torch.device) -> float:
    floors.sync(device)
    start = time.perf_counter()
    fn()
    floors.sync(device)
    return time.perf_counter() - start


def _hf_prefill(hf: Any, ids: torch.Tensor) -> tuple[float, Any]:
    """Seconds of one prefill of ids [B, L] (last token's logits only, as ours), and its KV cache."""
    out: list[Any] = []

    def run() -> None:
        with torch.inference_mode():
            out.append(hf(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values)

    return _timed(run, ids.device), out[0]


def _hf_decode_ms(hf: Any, context_ids: torch.Tensor, steps: int, vocab: int, seed: int) -> float:
    """Median ms of single-token forwards after a (re-)prefilled context; [B, 1] tokens per step."""
    _, cache = _hf_prefill(hf, context_ids)  # a fresh cache each round: transformers' crop() API moved in 5.x
    batch = context_ids.shape[0]
    tokens = random_ids(batch * (steps + 1), vocab, seed).view(steps + 1, batch, 1).to(context_ids.device)
    times = []
    for i in range(steps + 1):

        def step(i: int = i) -> None:
            with torch.inference_mode():
                hf(input_ids=tokens[i], past_key_values=cache, use_cache=True, logits_to_keep=1)

        seconds = _timed(step, context_ids.device)
        if i:  # the first step after a prefill is a warm-up, as in ours
            times.append(seconds)
    return 1000 * statistics.median(times)


def _ours_batch_ms(model: LlamaModel, caches: list[KVCache], context: int, steps: int) -> float:
    """Median ms of batch decode steps (all caches one token each), then every cache cut back to `context`."""
    times = [batch_decode_step(model, caches, token=step + 2) for step in range(steps + 1)][1:]
    for cache in caches:
        cache.truncate(context)
    return 1000 * statistics.median(times)


def _speed_model(check: Check, shape: str) -> tuple[LlamaModel, dict[str, torch.Tensor], RawModel | None, str]:
    """The model to time, the weights transformers gets, the raw model (for its tokenizer) and where it came from."""
    device = check.device
    dtype, fmt = default_dtype(device)
    if shape == "model":
        raw = check.raw_model()
        model = LlamaModel(raw.config, raw.weights, device=device, dtype=dtype, weight_format=fmt)
        return model, raw.weights, raw, "file"
    config = SHAPES[shape].config
    # drawn on the device in the speed dtype: values do not change a step's cost, and 8B fp32 would be 32 GB
    weights = random_llama_weights(config, seed=2, device=device, dtype=dtype)
    return LlamaModel(config, weights, device=device, dtype=dtype, weight_format=fmt), weights, None, "random"


def _speed_rounds(check: Check, model: LlamaModel, hf: Any, plan: Plan) -> dict[str, list[float]]:
    """Rounds of ours beside transformers, measure by measure, so both see the same machine state."""
    device, vocab = check.device, model.config.vocab_size
    context, n = plan.decode_context, plan.batch_size
    ids = {length: random_ids(length, vocab, seed=length) for length in plan.prefill_lengths}
    context_ids = random_ids(context, vocab, seed=5)
    for length_ids in ids.values():  # warm-ups: first-call allocations and kernel selection, both sides
        timed_prefill(model, length_ids, spare=0)
        _hf_prefill(hf, length_ids[None].to(device))
    single = timed_prefill(model, context_ids, spare=plan.decode_tokens + 8)[1]
    batch_caches = slot_caches(model, n, context + plan.decode_tokens + 8)
    for cache in batch_caches:  # a step's cost does not depend on the KV values: copies of one context
        cache.append(single.slice(0, context))
    hf_single, hf_batch = context_ids[None].to(device), context_ids[None].repeat(n, 1).to(device)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for round_ in range(plan.rounds):
        log(
            f"   round {round_ + 1}/{plan.rounds}: prefill {list(ids)}, decode @{context} batch 1 and {n}, "
            f"ours then transformers"
        )
        for length, length_ids in ids.items():
            add(f"ours_prefill_s_{length}", timed_prefill(model, length_ids, spare=0)[0])
            add(f"hf_prefill_s_{length}", _hf_prefill(hf, length_ids[None].to(device))[0])
        add("ours_decode_ms", decode_ms(model, single, context, plan.decode_tokens))
        add("hf_decode_ms", _hf_decode_ms(hf, hf_single, plan.decode_tokens, vocab, seed=round_))
        add("ours_batch_ms", _ours_batch_ms(model, batch_caches, context, plan.decode_tokens))
        add("hf_batch_ms", _hf_decode_ms(hf, hf_batch, plan.decode_tokens, vocab, seed=100 + round_))
    return samples


def _engine_batch(check: Check, raw: RawModel, model: LlamaModel, plan: Plan) -> Json:
    dtype, _ = default_dtype(check.device)
    setup = Setup(raw, model, check.device, dtype)
    eplan = replace(
        engine_bench.QUICK, batch_size=plan.batch_size, batch_context=plan.decode_context, batch_steps=plan.engine_steps
    )
    return engine_bench.bench_engine_batch(setup, eplan)


def section_speed(check: Check, shape: str) -> Json:
    device, plan = check.device, speed_plan(check.plan, check.device)
    dtype, _ = default_dtype(device)
    _transformers()
    start = time.perf_counter()
    model, weights, raw, source = _speed_model(check, shape)
    ours_build_s = time.perf_counter() - start
    config = model.config
    start = time.perf_counter()
    hf = hf_llama_from_weights(config, weights, device=device, dtype=dtype)
    hf_build_s = time.perf_counter() - start
    del weights  # what the models share stays alive through them; the rest can go
    weight_bytes = floors.decode_weight_bytes(model)
    log(
        f"   {config.name} ({source}): {weight_bytes / 1e9:.2f} GB of {dtype} weights per decode step; "
        f"built in {ours_build_s:.1f} s (transformers {hf_build_s:.1f} s)"
    )
    m = {key: statistics.median(v) for key, v in _speed_rounds(check, model, hf, plan).items()}
    del hf
    n, context = plan.batch_size, plan.decode_context
    result: Json = {
        "model": config.name,
        "source": source,
        "dtype": str(dtype),
        "weight_bytes": weight_bytes,
        "layer_params": floors.layer_params(config),
        "rounds": plan.rounds,
        "build_s": {"ours": ours_build_s, "transformers": hf_build_s},
        "prefill": {},
        "decode": {
            "context": context,
            "ours_ms": m["ours_decode_ms"],
            "hf_ms": m["hf_decode_ms"],
            "speedup_vs_hf": m["hf_decode_ms"] / m["ours_decode_ms"],
        },
        "batch": {
            "size": n,
            "context": context,
            "ours_step_ms": m["ours_batch_ms"],
            "hf_step_ms": m["hf_batch_ms"],
            "ours_tok_s": 1000 * n / m["ours_batch_ms"],
            "hf_tok_s": 1000 * n / m["hf_batch_ms"],
            "speedup_vs_hf": m["hf_batch_ms"] / m["ours_batch_ms"],
            "vs_batch1": m["ours_decode_ms"] * n / m["ours_batch_ms"],
        },
    }
    floor = check.results.get("floors")
    for length in plan.prefill_lengths:
        ours_s, hf_s = m[f"ours_prefill_s_{length}"], m[f"hf_prefill_s_{length}"]
        entry = {
            "ours_tok_s": length / ours_s,
            "hf_tok_s": length / hf_s,
            "speedup_vs_hf": hf_s / ours_s,
            "ours_tflops": floors.prefill_flops(config, length) / ours_s / 1e12,
        }
        if floor:
            entry["ours_vs_mm"] = entry["ours_tflops"] * 1e3 / floor["matmul_gflops"]
        result["prefill"][str(length)] = entry
    if floor:  # one decode step streams every weight once: the time to read them is its floor
        floor_ms = 1000 * weight_bytes / (floor["bandwidth_gbs"] * 1e9)
        result["decode"].update(
            floor_ms=floor_ms,
            floor_read_ms=1000 * weight_bytes / (floor["read_gbs"] * 1e9),
            ours_x_floor=m["ours_decode_ms"] / floor_ms,
            hf_x_floor=m["hf_decode_ms"] / floor_ms,
        )
        result["batch"]["floor_tok_s"] = 1000 * n / floor_ms
    if raw is not None:
        result["engine_batch"] = _guarded(lambda: _engine_batch(check, raw, model, plan))
    else:
        result["engine_batch"] = {"skipped": "random weights have no tokenizer for Engine"}
    d, b = result["decode"], result["batch"]
    log(
        f"   decode @{context}: ours {d['ours_ms']:.2f} ms, transformers {d['hf_ms']:.2f} ms"
        + (f", floor {d['floor_ms']:.2f} ms" if "floor_ms" in d else "")
        + f"; batch {n}: ours {b['ours_tok_s']:.0f} tok/s, transformers {b['hf_tok_s']:.0f} tok/s"
    )
    return result


# -- the summary ------------------------------------------------------------------------------------
def _f(value: Any, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def _error_line(status: Json) -> str:
    lines = [line for line in status.get("error", "").strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else status.get("skipped", "")


# Rough bounds for a verdict in the summary (the JSON has the figures): same dtype on two devices should agree
# almost exactly; bf16 flips near-ties; ours in bf16 should be no further from the fp32 truth than transformers.
FP32_MIN_ARGMAX, FP32_MAX_KL = 0.99, 1e-4
BF16_MIN_ARGMAX, BF16_MAX_KL = 0.90, 0.02


def _verdict(good: bool) -> str:
    return "ok" if good else "SUSPECT"


def _numerics_lines(num: Json) -> list[str]:
    lines = [
        f"numerics: {num['model']} vs fp32 on the CPU (logits over {', '.join(num['logit_scale'])} tokens; "
        f"greedy replies to {len(num['reference']['texts'])} chat prompts)"
    ]
    for name in ("device_fp32", "device_bf16"):
        entry = num.get(name, {})
        if "logits_vs_cpu_fp32" not in entry:
            lines.append(f"  {name}: {_error_line(entry) or 'missing'}")
            continue
        dist = entry["logits_vs_cpu_fp32"].values()
        min_argmax, max_kl = (FP32_MIN_ARGMAX, FP32_MAX_KL) if name == "device_fp32" else (BF16_MIN_ARGMAX, BF16_MAX_KL)
        good = all(d["argmax_agreement"] >= min_argmax and d["kl_mean"] <= max_kl for d in dist)
        lines.append(
            f"  {name} [{_verdict(good)}]: max|dlogit| "
            f"{' / '.join(_f(d['max_abs_logit_diff'], '.3g') for d in dist)}, argmax "
            f"{' / '.join(_f(100 * d['argmax_agreement'], '.1f') + '%' for d in dist)}, KL "
            f"{' / '.join(_f(d['kl_mean'], '.1e') for d in dist)}; greedy common prefix "
            f"{entry['greedy']['common_prefix']} of {[len(t) for t in num['reference']['tokens']]}"
        )
    lines.append(
        f"  reference first-token top-2 probabilities (near-ties flip in bf16): "
        f"{num['reference'].get('first_token_top2')}"
    )
    texts = {
        "cpu": num["reference"]["texts"],
        **{k: num[k]["greedy"]["texts"] for k in ("device_fp32", "device_bf16") if "greedy" in num.get(k, {})},
    }
    for i in range(len(texts["cpu"])):
        for name, replies in texts.items():
            lines.append(f"  [{i}] {name:11} {json.dumps(replies[i])[:100]}")
    return lines


def _vs_hf_lines(name: str, entry: Json) -> list[str]:
    parts = []
    for dtype in ("fp32", "bf16"):
        d = entry.get(dtype, {}).get("ours_vs_hf")
        if d is None:
            parts.append(f"{dtype}: {_error_line(entry.get(dtype, {})) or 'missing'}")
            continue
        good = d["argmax_agreement"] >= FP32_MIN_ARGMAX and d["kl_mean"] <= FP32_MAX_KL if dtype == "fp32" else True
        parts.append(
            f"{dtype}{'' if good else ' [SUSPECT]'} max|d| {_f(d['max_abs_logit_diff'], '.3g')} argmax "
            f"{100 * d['argmax_agreement']:.1f}%"
        )
    bf16 = entry.get("bf16", {})
    if "ours_vs_hf_fp32" in bf16:
        ours, theirs = bf16["ours_vs_hf_fp32"]["kl_mean"], bf16["hf_bf16_vs_hf_fp32"]["kl_mean"]
        parts.append(
            f"vs fp32 truth [{_verdict(ours <= 2 * theirs + FP32_MAX_KL)}]: ours-bf16 KL {_f(ours, '.1e')}, "
            f"hf-bf16 KL {_f(theirs, '.1e')}"
        )
    return [f"  {name} (logit scale {_f(entry['logit_scale'], '.3g')}): " + "; ".join(parts)]


def _speed_rows(name: str, s: Json) -> list[str]:
    d, b = s["decode"], s["batch"]
    prefill = " ".join(f"{_f(e['ours_tok_s'], '.0f')}/{_f(e['hf_tok_s'], '.0f')}" for e in s["prefill"].values())
    engine = s.get("engine_batch", {})
    return [
        f"  {name:8} {s['weight_bytes'] / 1e9:6.2f}  prefill {list(s['prefill'])} ours/hf tok/s {prefill}; "
        f"decode@{d['context']} ours {_f(d['ours_ms'])} hf {_f(d['hf_ms'])} ms (floor {_f(d.get('floor_ms'))}, "
        f"ours {_f(d.get('ours_x_floor'), '.1f')}x); batch {b['size']} ours {_f(b['ours_tok_s'], '.0f')} "
        f"hf {_f(b['hf_tok_s'], '.0f')} tok/s"
        + (f", Engine.step {_f(engine['batch8_engine_tok_s'], '.0f')}" if "batch8_engine_tok_s" in engine else "")
    ]


def summary_lines(results: Json) -> list[str]:
    sections = results.get("sections", {})
    env = results.get("env", {})
    ok = sum(1 for s in sections.values() if s.get("ok"))
    lines = [
        f"cuda_check on {env.get('gpu') or results.get('device')} (torch {env.get('torch')}, CUDA "
        f"{env.get('torch_cuda')}, transformers {env.get('transformers')}): {ok}/{len(sections)} sections ok "
        f"in {_f(results.get('elapsed_s'), '.0f')} s"
        + (f"; KILLED in {results['killed_in']}" if results.get("killed_in") else "")
    ]
    for name, status in sections.items():
        if not status.get("ok"):
            lines.append(f"  {'SKIPPED' if 'skipped' in status else 'FAILED'} {name}: {_error_line(status)}")
    if "numerics" in results:
        lines += _numerics_lines(results["numerics"])
    vs_hf = {k.split(":", 1)[1]: v for k, v in results.items() if k.startswith("vs_transformers:")}
    if vs_hf:
        lines.append("vs transformers, random weights (ours vs HF in the same dtype):")
        for name, entry in vs_hf.items():
            lines += _vs_hf_lines(name, entry)
    if "floors" in results:
        fl = results["floors"]
        lines.append(
            f"floors ({fl['dtype']}): mm {fl['matmul_gflops'] / 1e3:.1f} TFLOP/s, copy "
            f"{fl['bandwidth_gbs']:.0f} GB/s, read {fl['read_gbs']:.0f} GB/s, GEMV {fl['gemv_gbs']:.0f} GB/s"
        )
    speed = {k.split(":", 1)[1]: v for k, v in results.items() if k.startswith("speed:")}
    if speed:
        lines.append("speed (engine default dtype; GB = weights streamed per decode step):")
        for name, entry in speed.items():
            lines += _speed_rows(name, entry)
    return lines


# -- entry point ------------------------------------------------------------------------------------
def _shape_names(values: list[str]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {sorted(SHAPES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.bench.cuda_check", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="a .gguf file or HF directory (without it: no numerics, no speed:model)"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here (after each section)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="short prompts, one round: for smoke tests")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(DEFAULT_SHAPES),
        help=f"random-weight shapes, space or comma separated, of {sorted(SHAPES)}",
    )
    parser.add_argument(
        "--sections",
        default="floors,numerics,vs_transformers,speed",
        help="comma-separated subset of floors,numerics,vs_transformers,speed (env always runs)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=180.0,
        help="sections that would start after this many seconds are skipped (default 180)",
    )
    parser.add_argument("--summarize", metavar="JSON", default=None, help="print the summary of a results file, exit")
    return parser


def _plan_sections(check: Check, shapes: list[str], wanted: set[str]) -> list[tuple[str, Callable[[], Json]]]:
    device, args = check.device, check.args
    plan: list[tuple[str, Callable[[], Json]]] = [("env", lambda: section_env(device))]
    if "floors" in wanted:
        plan.append(("floors", lambda: section_floors(device, speed_plan(check.plan, device))))
    if "numerics" in wanted and args.model:
        plan.append(("numerics", lambda: section_numerics(check)))
    too_big = [] if device.type == "cuda" else [s for s in shapes if 4 * param_count(SHAPES[s].config) > CPU_MAX_BYTES]
    if too_big:
        check.results["skipped_shapes"] = {s: "too large for fp32 on the CPU" for s in too_big}
    usable = [s for s in shapes if s not in too_big]
    if "vs_transformers" in wanted:
        plan += [
            (f"vs_transformers:{s}", lambda s=s: section_vs_transformers(check, SHAPES[s].config))
            for s in usable
            if SHAPES[s].vs_transformers
        ]
    if "speed" in wanted:
        speed = (["model"] if args.model else []) + [s for s in usable if SHAPES[s].speed]
        plan += [(f"speed:{s}", lambda s=s: section_speed(check, s)) for s in speed]
    return plan


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summarize:
        print("\n".join(summary_lines(json.loads(Path(args.summarize).read_text()))))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check = Check(args, device, QUICK if args.quick else FULL)
    wanted = {s.strip() for s in args.sections.split(",")}

    def killed(signum: int, _frame: FrameType | None) -> None:  # `timeout` sends SIGTERM: keep what was measured
        check.results["killed_in"] = check.current or "between sections"
        check.save()
        log(f"killed by signal {signum} during {check.results['killed_in']}")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, killed)
    for name, fn in _plan_sections(check, _shape_names(args.shapes), wanted):
        check.run(name, fn)
    print("\n".join(summary_lines(check.results)), flush=True)
    if args.json_path:
        log(f"wrote {args.json_path}")
    failed = [n for n, s in check.results["sections"].items() if not s.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
