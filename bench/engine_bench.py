"""`kvmesh bench engine`: the engine's prefill and decode speed beside its physical floors and transformers.

One run measures everything side by side, because this 2-core machine is shared and noisy: the ratios
inside a run (ours / floor, ours / transformers, int4 / fp32, batch 8 / batch 1) are what to trust, the
absolute figures less so. Results go to a table on stdout and, with --json, to a JSON file; progress
lines go to stderr.

Sections: machine floors; prefill at several lengths; decode at several contexts; batch-8 decode (one
ForwardBatch of 8 sequences, and the same through Engine.step); other weight formats (speed and logits
distance from fp32); transformers on the same GGUF; llama.cpp on the same GGUF (llama_cpp_engine, when
llama-cpp-python is installed); the issue's targets, each marked pass or miss.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.block_quant_linear import decode_threads
from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.linear import QUANTIZED_FORMATS, WeightFormat, make_linear
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_files import resolve_model_path
from kvmesh.workers.sampling import SamplingParams

from . import floors, llama_cpp_engine
from .bench_common import (
    SAMPLE_TEXT,
    Json,
    Setup,
    all_logits,
    batch_decode_step,
    build_model,
    decode_logits,
    decode_ms,
    load_setup,
    log,
    logits_distance,
    machine_info,
    median_spread,
    print_targets,
    random_ids,
    restart_clock,
    settle,
    slot_caches,
    target_entry,
    timed_prefill,
)
from .json_report import save_json

# The issues' targets: decode <= 50 ms/token at 512 and <= 1.3x the memory floor of the format used,
# prefill >= 80% of the matmul rate, decode and prefill >= 1.5x transformers, batch-8 aggregate >= 4x batch 1,
# decode faster than llama.cpp's, and no figure's repeats more than 10% apart.
TARGET_DECODE_MS = 50.0
TARGET_DECODE_VS_FLOOR = 1.3
TARGET_PREFILL_EFFICIENCY = 0.8
TARGET_VS_TRANSFORMERS = 1.5
TARGET_BATCH_SPEEDUP = 4.0
TARGET_VS_LLAMACPP = 1.0  # llama.cpp ms/token / ours: above 1 is faster (an exact tie is not a practical case)
TARGET_SPREAD = 0.10


@dataclass(frozen=True)
class Plan:
    """What to measure and how often; FULL for the real run, QUICK for the CI smoke test (< 60 s)."""

    prefill_runs: dict[int, int]  # prompt length -> timed runs (median); the longest also seeds decode
    decode_contexts: tuple[int, ...]  # must include main_context and batch_context
    decode_tokens: int  # timed single-token forwards per measurement (median)
    main_context: int  # the context the targets are stated at
    batch_size: int
    batch_context: int
    batch_steps: int
    batch_prefill: bool  # prefill the batch's prompts in one forward (and time it), or copy one context
    engine_batch: bool  # also time batch decode through Engine.step (scheduler + sampling included)
    formats: tuple[WeightFormat, ...]
    format_prompt_tokens: int
    format_rounds: int  # interleaved fp32 / format decode measurements
    transformers_rounds: int  # 0 skips transformers
    transformers_new_tokens: int
    llamacpp_rounds: int  # interleaved llama.cpp / ours rounds at the prefill lengths and decode contexts
    floor_sizes: floors.FloorSizes


FULL = Plan(
    prefill_runs={128: 3, 512: 3, 2048: 2},
    decode_contexts=(512, 2048),
    decode_tokens=16,
    main_context=512,
    batch_size=8,
    batch_context=512,
    batch_steps=12,
    batch_prefill=True,
    engine_batch=True,
    formats=("bf16", "int8", "int4"),
    format_prompt_tokens=128,
    format_rounds=2,
    transformers_rounds=3,
    transformers_new_tokens=32,
    llamacpp_rounds=3,
    floor_sizes=floors.FloorSizes(),
)
QUICK = Plan(
    prefill_runs={64: 1, 128: 1},
    decode_contexts=(128,),
    decode_tokens=4,
    main_context=128,
    batch_size=8,
    batch_context=128,
    batch_steps=3,
    batch_prefill=False,
    engine_batch=False,
    formats=("int4",),  # the quantized format that reads the fewest bytes
    format_prompt_tokens=16,
    format_rounds=1,
    transformers_rounds=0,
    transformers_new_tokens=0,
    llamacpp_rounds=2,  # llama.cpp loads in under a second: it runs in --quick too, when installed
    floor_sizes=floors.QUICK_SIZES,
)


def bench_floors(setup: Setup, plan: Plan) -> Json:
    log("floors: matmul rate, copy bandwidth, GEMV rate")
    found = floors.measure_floors(setup.device, setup.dtype, plan.floor_sizes)
    config = setup.model.config
    weight_bytes = floors.decode_weight_bytes(setup.model)
    result: Json = found.as_dict()
    result.update(
        weight_bytes_per_token=weight_bytes,
        decode_ms=1000 * weight_bytes / (found.bandwidth_gbs * 1e9),
        decode_read_ms=1000 * weight_bytes / (found.read_gbs * 1e9),
        decode_gemv_ms=1000 * weight_bytes / (found.gemv_gbs * 1e9),
        decode_flops_per_token={str(c): floors.decode_flops(config, c) for c in plan.decode_contexts},
        prefill_flops_per_token={str(n): floors.prefill_flops(config, n) / n for n in plan.prefill_runs},
        prefill_tok_s={
            str(n): found.matmul_gflops * 1e9 * n / floors.prefill_flops(config, n) for n in plan.prefill_runs
        },
    )
    log(
        f"  mm {found.matmul_gflops:.0f} GFLOP/s, copy {found.bandwidth_gbs:.1f} GB/s, read {found.read_gbs:.1f} "
        f"GB/s, GEMV {found.gemv_gbs:.1f} GB/s; decode floor {result['decode_ms']:.1f} ms"
    )
    return result


def bench_prefill(setup: Setup, plan: Plan, floor: Json) -> tuple[Json, KVCache]:
    """Prefill tok/s per length; returns the longest prompt's cache so decode can reuse it."""
    model, vocab = setup.model, setup.model.config.vocab_size
    timed_prefill(model, random_ids(32, vocab, seed=0), spare=0)  # warm-up: first-call allocations
    tok_s: dict[str, float] = {}
    spread: dict[str, float] = {}
    gflops: dict[str, float] = {}
    cache: KVCache | None = None
    for length, runs in sorted(plan.prefill_runs.items()):
        times = []
        for run in range(runs):
            log(f"prefill {length} tokens, run {run + 1}/{runs}")
            seconds, cache = timed_prefill(model, random_ids(length, vocab, seed=length + run), spare=64)
            times.append(seconds)
        tok_s[str(length)], spread[str(length)] = median_spread([length / seconds for seconds in times])
        seconds = length / tok_s[str(length)]
        gflops[str(length)] = floors.prefill_flops(model.config, length) / seconds / 1e9
        log(f"  {tok_s[str(length)]:.0f} tok/s ({gflops[str(length)]:.0f} GFLOP/s)")
    assert cache is not None
    return {
        "prefill_tok_s": tok_s,
        "prefill_spread": spread,
        "prefill_gflops": gflops,
        "prefill_efficiency": {n: g / floor["matmul_gflops"] for n, g in gflops.items()},  # the target's measure
        "prefill_efficiency_vs_linear": {n: g / floor["linear_gflops"] for n, g in gflops.items()},
    }, cache


def bench_decode(setup: Setup, plan: Plan, longest: KVCache) -> tuple[Json, dict[int, KVCache]]:
    """ms/token at each context; returns a cache per context for the later side-by-side sections."""
    model, vocab = setup.model, setup.model.config.vocab_size
    caches: dict[int, KVCache] = {}
    result: dict[str, float] = {}
    spread: dict[str, float] = {}
    blocks: dict[str, int] = {}
    for context in plan.decode_contexts:
        if context <= longest.length:
            caches[context] = longest.slice(0, context)
            caches[context].reserve(64)  # room for the decode and batch-1 steps that later sections run
        else:
            log(f"decode @{context}: prefilling the context")
            caches[context] = timed_prefill(model, random_ids(context, vocab, seed=7), spare=64)[1]
        log(f"decode @{context}: blocks of {plan.decode_tokens} single-token forwards until two agree")
        settled = settle(
            lambda cache=caches[context], context=context: decode_ms(model, cache, context, plan.decode_tokens)
        )
        result[str(context)], spread[str(context)], blocks[str(context)] = settled.value, settled.spread, settled.blocks
        log(f"  {settled.value:.1f} ms/token ({settled.blocks} blocks; spread of the last two {settled.spread:.0%})")
    return {"decode_ms_per_token": result, "decode_spread": spread, "decode_blocks": blocks}, caches


def _batch_prefill(model: LlamaModel, n: int, context: int, spare: int) -> tuple[float, list[KVCache]]:
    """Seconds for N prompts of `context` tokens prefilled together in one ForwardBatch, and their caches."""
    ids = [random_ids(context, model.config.vocab_size, seed=100 + i) for i in range(n)]
    caches = slot_caches(model, n, context + spare)
    batch = ForwardBatch(
        token_ids=torch.cat(ids),
        positions=torch.arange(context).repeat(n),
        chunks=[SequenceChunk(c, context, prompt=True) for c in caches],
        logit_rows=torch.arange(1, n + 1) * context - 1,
    )
    start = time.perf_counter()
    model.forward(batch)
    floors.sync(model.device)
    return time.perf_counter() - start, caches


def bench_batch(setup: Setup, plan: Plan, single: KVCache) -> Json:
    """Batch-N decode in one ForwardBatch, interleaved step by step with batch-1 decode at the same context."""
    model, n, context = setup.model, plan.batch_size, plan.batch_context
    result: Json = {"batch_size": n, "batch_context": context}
    if plan.batch_prefill:
        log(f"batch {n}: prefilling {n} x {context} tokens in one ForwardBatch")
        prefill_s, caches = _batch_prefill(model, n, context, spare=plan.batch_steps + 8)
        result["batch8_prefill_tok_s"] = n * context / prefill_s
    else:  # a step's cost does not depend on the KV values, so copies of one context will do
        caches = slot_caches(model, n, context + plan.batch_steps + 8)
        for cache in caches:
            cache.append(single.slice(0, context))
    log(f"batch {n}: {plan.batch_steps} decode steps, each beside a batch-1 step")
    batch_decode_step(model, caches, token=1)  # warm-up for the N-row shapes
    single.truncate(context)
    batch_times, single_times = [], []
    for step in range(plan.batch_steps):
        batch_times.append(batch_decode_step(model, caches, token=step + 2))
        single_times.append(batch_decode_step(model, [single], token=step + 2))
    single.truncate(context)
    batch_s, single_s = statistics.median(batch_times), statistics.median(single_times)
    log(f"  batch {n}: {1000 * batch_s:.0f} ms/step, batch 1: {1000 * single_s:.0f} ms/step")
    return result | {
        "batch8_tok_s": n / batch_s,
        "batch1_tok_s": 1 / single_s,
        "batch8_speedup": single_s * n / batch_s,
        "batch8_step_ms": 1000 * batch_s,
        "batch1_step_ms": 1000 * single_s,
    }


def bench_engine_batch(setup: Setup, plan: Plan) -> Json:
    """Batch-N decode through Engine.step: the model's forward plus scheduling, batch assembly and sampling.

    Steps are timed only once every request is past its (chunked) prefill, so each timed step is a pure
    decode step of all N requests.
    """
    model, n, context = setup.model, plan.batch_size, plan.batch_context
    # plain decoding (speculation has its own bench), no reuse between prompts
    engine = Engine(model, setup.raw.tokenizer, EngineConfig(prefix_cache=None, speculation=None))
    # The first request starts decoding while the others still prefill in chunks: it must keep going
    # through all of their prefill steps and then `batch_steps` more, or no step has all N decoding.
    prefill_steps = -(-n * context // engine.config.scheduler.max_batch_tokens) + 2
    sampling = SamplingParams(max_tokens=prefill_steps + plan.batch_steps, ignore_eos=True)
    ids = [
        engine.add_request(random_ids(context, model.config.vocab_size, seed=200 + i).tolist(), sampling)
        for i in range(n)
    ]
    log(f"engine batch {n}: {n} requests of {context} prompt tokens, {sampling.max_tokens} tokens each")
    started: set[str] = set()
    times: list[float] = []
    while engine.has_work():
        start = time.perf_counter()
        events = engine.step()
        elapsed = time.perf_counter() - start
        tokens = [e for e in events if e.token_id is not None]
        if len(started) == n and len(tokens) == n:
            times.append(elapsed)
        started.update(e.request_id for e in tokens)
    step_s = statistics.median(times)
    log(f"  {1000 * step_s:.0f} ms/step over {len(times)} steps of {len(ids)} requests")
    return {"batch8_engine_tok_s": n / step_s, "batch8_engine_step_ms": 1000 * step_s}


def _gate_up_gbs(setup: Setup, fmt: WeightFormat) -> float:
    """Weight GB/s of layer 0's gate_up product alone, one row, in `fmt` (cache-hot: a kernel's own rate)."""
    weights, mlp = setup.raw.weights, "model.layers.0.mlp"
    gate_up = torch.cat([weights[f"{mlp}.gate_proj.weight"], weights[f"{mlp}.up_proj.weight"]])
    linear = make_linear(gate_up, fmt, setup.device)
    x = torch.randn(1, gate_up.shape[1], device=setup.device, dtype=setup.dtype)
    with decode_threads(1) if fmt in QUANTIZED_FORMATS else nullcontext():  # as a decode step runs it
        seconds = floors.median_seconds(lambda: linear(x), setup.device, repeats=20, warmup=3)
    return linear.weight_bytes / seconds / 1e9


def _format_entry(
    setup: Setup,
    plan: Plan,
    fmt: WeightFormat,
    reference: LlamaModel,
    cache: KVCache,
    reference_logits: torch.Tensor,
    prompt: list[int],
    bandwidth_gbs: float,
) -> Json:
    log(f"weight format {fmt}: building, then logits of a {len(prompt)}-token prompt")
    start = time.perf_counter()
    model = build_model(setup.raw, setup.device, setup.dtype, fmt)
    entry: Json = {"build_s": time.perf_counter() - start, "weight_bytes": floors.decode_weight_bytes(model)}
    entry["floor_decode_ms"] = 1000 * entry["weight_bytes"] / (bandwidth_gbs * 1e9)
    entry["gate_up_gemv_gbs"] = _gate_up_gbs(setup, fmt)
    entry.update(logits_distance(reference_logits, decode_logits(model, prompt)))
    ours, theirs = [], []
    for _ in range(plan.format_rounds):  # interleaved, so both see the same machine load
        log(f"weight format {fmt}: decode @{plan.main_context} beside fp32")
        ours.append(decode_ms(model, cache, plan.main_context, plan.decode_tokens))
        theirs.append(decode_ms(reference, cache, plan.main_context, plan.decode_tokens))
    entry["decode_ms"], entry["decode_spread"] = median_spread(ours)
    entry["fp32_decode_ms"], entry["fp32_decode_spread"] = median_spread(theirs)
    entry["speedup_vs_fp32"] = entry["fp32_decode_ms"] / entry["decode_ms"]
    log(
        f"  {fmt}: {entry['decode_ms']:.1f} ms/token (fp32 {entry['fp32_decode_ms']:.1f}), "
        f"max |dlogit| {entry['max_abs_logit_diff']:.3f}, argmax agree {entry['argmax_agreement']:.1%}"
    )
    return entry


def bench_formats(setup: Setup, plan: Plan, cache: KVCache, bandwidth_gbs: float) -> Json:
    """Each other weight format: decode @main_context beside fp32, and its logits' distance from fp32.

    The fp32-built cache serves every format: the cache dtype does not depend on the weight format, and
    KV values do not change a step's cost. Each format's model is built once and freed after.
    """
    usable = [f for f in plan.formats if f != "fp32" and (setup.device.type == "cpu" or f == "bf16")]
    skipped = sorted(set(plan.formats) - set(usable) - {"fp32"})
    reference = setup.model
    if reference.weight_format != "fp32":  # the reference is always fp32, whatever format the run uses
        reference = build_model(setup.raw, setup.device, setup.dtype, "fp32")
    prompt = setup.raw.tokenizer.encode(SAMPLE_TEXT)[: plan.format_prompt_tokens]
    reference_logits = all_logits(reference, prompt)
    result: Json = {
        "fp32": {
            "weight_bytes": floors.decode_weight_bytes(reference),
            "gate_up_gemv_gbs": _gate_up_gbs(setup, "fp32"),
        }
    }
    unsupported = {fmt: "implemented for CPU only" for fmt in skipped}
    for fmt in usable:
        try:
            result[fmt] = _format_entry(setup, plan, fmt, reference, cache, reference_logits, prompt, bandwidth_gbs)
        except RuntimeError as exc:  # e.g. oneDNN has no bf16 kernel for this ISA: the other formats still run
            reason = str(exc).splitlines()[0]
            log(f"  {fmt}: skipped, this machine cannot run it ({reason})")
            unsupported[fmt] = f"this machine cannot run it ({reason[:60]}…)"
        gc.collect()  # the format's model is gone with its entry's frame; free its memory before the next
    if unsupported:
        result["skipped"] = "; ".join(f"{fmt}: {why}" for fmt, why in sorted(unsupported.items()))
    return result


# -- transformers -----------------------------------------------------------------------------------
def _load_transformers(model_spec: str, device: torch.device, dtype: torch.dtype) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub; set before the import
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = resolve_model_path(model_spec)
    if path.is_dir():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return hf.to(device).eval()


def _pad_id(eos: int | list[int] | None) -> int:
    """generate wants a pad id even for one unpadded sequence (else it warns); any EOS id will do."""
    if isinstance(eos, list):
        return eos[0] if eos else 0
    return 0 if eos is None else eos


def _hf_generate_s(hf: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for greedy generate of exactly `new_tokens` (min = max, so EOS cannot end it early)."""
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(hf.config.eos_token_id),
        )
    floors.sync(ids.device)
    return time.perf_counter() - start


def _engine_decode_ms(setup: Setup, ids: torch.Tensor, new_tokens: int) -> float:
    """ms/token of one request's decode phase through Engine.generate (sampling and bookkeeping included)."""
    engine = Engine(setup.model, setup.raw.tokenizer, EngineConfig(prefix_cache=None, speculation=None))
    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    rate = engine.generate([ids.tolist()], sampling)[0].stats.decode_tok_s
    assert rate is not None, "a decode of two or more tokens has a rate"
    return 1000 / rate


def _transformers_round(hf: Any, setup: Setup, plan: Plan, ids: torch.Tensor, cache: KVCache) -> dict[str, float]:
    """One round of transformers and ours, each measure right beside its counterpart."""
    context, new = ids.numel(), plan.transformers_new_tokens
    hf_ids = ids[None].to(setup.device)
    hf_prefill = _hf_generate_s(hf, hf_ids, 1)
    return {
        "ours_prefill_s": timed_prefill(setup.model, ids, spare=0)[0],
        "transformers_prefill_s": hf_prefill,
        "ours_decode_ms": decode_ms(setup.model, cache, context, plan.decode_tokens),
        "ours_engine_decode_ms": _engine_decode_ms(setup, ids, new),
        "transformers_decode_ms": 1000 * (_hf_generate_s(hf, hf_ids, new) - hf_prefill) / (new - 1),
    }


def bench_transformers(args: argparse.Namespace, setup: Setup, plan: Plan, cache: KVCache) -> Json:
    """transformers' decode ms/token and prefill tok/s at main_context, interleaved round by round with ours.

    generate(1 token) is prefill only; generate(N) adds N - 1 decode steps; their difference / (N - 1) is
    transformers' decode ms/token with its generation loop included. Ours is given both as the bare model
    forward (the headline figure) and through Engine.generate, the like-for-like user path.
    """
    if plan.transformers_rounds == 0:
        return {"skipped": "--quick: transformers takes ~35 s to load"}
    log("transformers: loading the same model (~35 s)")
    start = time.perf_counter()
    hf = _load_transformers(args.model, setup.device, setup.dtype)
    load_s = time.perf_counter() - start
    ids = random_ids(plan.main_context, setup.model.config.vocab_size, seed=300)
    _hf_generate_s(hf, ids[None].to(setup.device), 1)  # warm-up
    rounds = []
    for round_ in range(plan.transformers_rounds):
        log(
            f"transformers round {round_ + 1}/{plan.transformers_rounds}: prefill and a "
            f"{plan.transformers_new_tokens}-token generate, ours beside"
        )
        rounds.append(_transformers_round(hf, setup, plan, ids, cache))
    del hf
    gc.collect()
    m = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    spread = {key.removesuffix("_s").removesuffix("_ms"): median_spread([r[key] for r in rounds])[1] for key in m}
    log(
        f"  decode: ours {m['ours_decode_ms']:.1f} ms (engine {m['ours_engine_decode_ms']:.1f}), "
        f"transformers {m['transformers_decode_ms']:.1f} ms/token"
    )
    return {
        "context": plan.main_context,
        "new_tokens": plan.transformers_new_tokens,
        "rounds": len(rounds),
        "load_s": load_s,
        **{k: v for k, v in m.items() if k.endswith("_ms")},
        "decode_speedup": m["transformers_decode_ms"] / m["ours_decode_ms"],
        "engine_decode_speedup": m["transformers_decode_ms"] / m["ours_engine_decode_ms"],
        "ours_prefill_tok_s": plan.main_context / m["ours_prefill_s"],
        "transformers_prefill_tok_s": plan.main_context / m["transformers_prefill_s"],
        "prefill_speedup": m["transformers_prefill_s"] / m["ours_prefill_s"],
        "spread": spread,
    }


# -- llama.cpp ------------------------------------------------------------------------------------
def _ours_measure(model: LlamaModel) -> llama_cpp_engine.Measure:
    """Our side of the llama.cpp rounds: a timed prefill of ids [n] into a fresh cache, then decode_ms on it."""

    def measure(ids: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
        seconds, cache = timed_prefill(model, ids, spare=decode_tokens + 1)  # decode_ms runs tokens + 1 steps
        return seconds, decode_ms(model, cache, ids.numel(), decode_tokens) if decode_tokens else None

    return measure


def bench_llamacpp(args: argparse.Namespace, setup: Setup, plan: Plan) -> Json:
    """llama.cpp on the same GGUF at the prefill lengths and decode contexts, interleaved with ours."""
    sizes = llama_cpp_engine.Sizes(
        prefill_lengths=tuple(sorted(plan.prefill_runs)),
        decode_contexts=plan.decode_contexts,
        decode_tokens=plan.decode_tokens,
        rounds=plan.llamacpp_rounds,
    )
    return llama_cpp_engine.bench_llamacpp(
        resolve_model_path(args.model),
        torch.get_num_threads(),
        sizes,
        setup.model.config.vocab_size,
        _ours_measure(setup.model),
    )


# -- targets and the table --------------------------------------------------------------------------
def collect_spreads(results: Json) -> Json:
    """Every repeated figure's spread, flat by name, and the worst: how far apart its repeats landed."""
    figures: dict[str, float] = {}
    figures |= {f"prefill_tok_s@{n}": x for n, x in results.get("prefill_spread", {}).items()}
    figures |= {f"decode_ms@{c}": x for c, x in results.get("decode_spread", {}).items()}
    for fmt, entry in results.get("weight_formats", {}).items():
        if isinstance(entry, dict) and "decode_spread" in entry:
            figures[f"weight_formats.{fmt}.decode_ms"] = entry["decode_spread"]
            figures[f"weight_formats.{fmt}.fp32_decode_ms"] = entry["fp32_decode_spread"]
    figures |= {f"vs_transformers.{k}": x for k, x in results.get("vs_transformers", {}).get("spread", {}).items()}
    llama = results.get("llamacpp", {})
    for side, block in (("llama_cpp", llama), ("ours", llama.get("ours", {}))):
        for kind in ("prefill_tok_s", "decode_ms"):
            spreads = block.get(f"{kind.split('_')[0]}_spread", {})
            figures |= {f"llamacpp.{side}.{kind}@{n}": x for n, x in spreads.items()}
    worst = max(figures, key=figures.__getitem__) if figures else None
    return {
        "figures": figures,
        "max": figures[worst] if worst else None,
        "worst": worst,
        "definition": "(max - min) / median over a figure's repeats (runs or rounds); for the main decode "
        "figures, the distance of the last two blocks that settle() ran",
    }


def evaluate_targets(results: Json, plan: Plan) -> Json:
    main, batch = str(plan.main_context), results["batch_context"]
    vs_hf, vs_llama = results["vs_transformers"], results["vs_llamacpp"]
    decode, floor_ms = results["decode_ms_per_token"].get(main), results["floor"].get("decode_ms")
    return {
        "decode_ms": target_entry(decode, TARGET_DECODE_MS, False, f"ms/token @{main}, batch 1"),
        "decode_vs_floor": target_entry(
            None if decode is None or not floor_ms else decode / floor_ms,
            TARGET_DECODE_VS_FLOOR,
            False,
            f"ms/token @{main} / the weights' bytes at the measured copy rate ({results['model']['weight_format']})",
        ),
        "prefill_efficiency": target_entry(
            results["prefill_efficiency"].get(main),
            TARGET_PREFILL_EFFICIENCY,
            True,
            f"prefill GFLOP/s @{main} / torch.mm GFLOP/s",
        ),
        "decode_vs_transformers": target_entry(
            vs_hf.get("decode_speedup"),
            TARGET_VS_TRANSFORMERS,
            True,
            vs_hf.get("skipped", f"transformers ms/token / ours @{main}"),
        ),
        "prefill_vs_transformers": target_entry(
            vs_hf.get("prefill_speedup"),
            TARGET_VS_TRANSFORMERS,
            True,
            vs_hf.get("skipped", f"transformers prefill s / ours @{main}"),
        ),
        "batch8_speedup": target_entry(
            results["batch8_speedup"],
            TARGET_BATCH_SPEEDUP,
            True,
            f"batch-{plan.batch_size} aggregate tok/s / batch-1 tok/s @{batch}",
        ),
        "decode_vs_llamacpp": target_entry(
            vs_llama.get("decode_speedup"),
            TARGET_VS_LLAMACPP,
            True,
            vs_llama.get(
                "skipped", f"llama.cpp ms/token / ours @{main}, llama.cpp on the GGUF's own quantized weights"
            ),
        ),
        "spread": target_entry(
            results["spread"]["max"], TARGET_SPREAD, False, f"the worst figure's spread: {results['spread']['worst']}"
        ),
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


Row = tuple[str, str, str, str]  # measure, ours, floor or peer, ratio


def _floor_rows(fl: Json) -> list[Row]:
    return [
        ("torch.mm GFLOP/s", _fmt(fl["matmul_gflops"], ".0f"), f"linear {fl['linear_gflops']:.0f}", ""),
        (
            "copy GB/s (read + write)",
            _fmt(fl["bandwidth_gbs"]),
            f"read {fl['read_gbs']:.1f}, GEMV {fl['gemv_gbs']:.1f}",
            "",
        ),
        (
            "weights per decode token MB",
            _fmt(fl["weight_bytes_per_token"] / 1e6, ".0f"),
            f"floor {fl['decode_ms']:.1f} ms at copy, {fl['decode_read_ms']:.1f} at read, "
            f"{fl['decode_gemv_ms']:.1f} at GEMV rate",
            "",
        ),
    ]


def _speed_rows(results: Json) -> list[Row]:
    fl, rows = results["floor"], []
    for n, tok_s in results["prefill_tok_s"].items():
        rows.append(
            (
                f"prefill {n} tok/s",
                _fmt(tok_s, ".0f"),
                f"floor {fl['prefill_tok_s'][n]:.0f}",
                f"{results['prefill_efficiency'][n]:.0%} of mm, "
                f"{results['prefill_efficiency_vs_linear'][n]:.0%} of linear",
            )
        )
    for c, ms in results["decode_ms_per_token"].items():
        ours = f"{_fmt(ms)} ±{results['decode_spread'][c]:.0%}"  # the last two blocks' distance
        rows.append(
            (
                f"decode @{c} ms/token",
                ours,
                f"floor {fl['decode_ms']:.1f}, GEMV {fl['decode_gemv_ms']:.1f}",
                f"{ms / fl['decode_ms']:.1f}x floor, {ms / fl['decode_gemv_ms']:.1f}x GEMV",
            )
        )
    n, context = results["batch_size"], str(results["batch_context"])
    rows.append(
        (
            f"batch-{n} decode @{context} tok/s",
            _fmt(results["batch8_tok_s"]),
            f"batch 1: {results['batch1_tok_s']:.1f}",
            f"{results['batch8_speedup']:.2f}x",
        )
    )
    if "batch8_engine_tok_s" in results:
        rows.append(
            (
                "  same through Engine.step",
                _fmt(results["batch8_engine_tok_s"]),
                "",
                f"{results['batch8_engine_tok_s'] / results['batch8_tok_s']:.0%} of model-only",
            )
        )
    if "batch8_prefill_tok_s" in results:
        rows.append(
            (
                f"batch-{n} prefill @{context} tok/s",
                _fmt(results["batch8_prefill_tok_s"], ".0f"),
                f"batch 1: {_fmt(results['prefill_tok_s'].get(context), '.0f')}",
                "",
            )
        )
    return rows


def _transformers_rows(vs: Json) -> list[Row]:
    if "decode_speedup" not in vs:
        return [("vs transformers", "-", vs.get("skipped", ""), "")]
    return [
        (
            f"vs transformers decode @{vs['context']} ms",
            _fmt(vs["ours_decode_ms"]),
            f"transformers {vs['transformers_decode_ms']:.1f}",
            f"{vs['decode_speedup']:.2f}x faster",
        ),
        (
            "  ours through Engine.generate",
            _fmt(vs["ours_engine_decode_ms"]),
            "",
            f"{vs['engine_decode_speedup']:.2f}x faster",
        ),
        (
            f"vs transformers prefill @{vs['context']} tok/s",
            _fmt(vs["ours_prefill_tok_s"], ".0f"),
            f"transformers {vs['transformers_prefill_tok_s']:.0f}",
            f"{vs['prefill_speedup']:.2f}x",
        ),
    ]


def _times_faster(speedup: float) -> str:
    """A vs_llamacpp speedup (> 1: kvmesh faster) in words either way."""
    if speedup >= 1:
        return f"{speedup:.2f}x, kvmesh faster"
    return f"{speedup:.2f}x, llama.cpp {1 / speedup:.1f}x faster"


def _llamacpp_rows(llama: Json, vs: Json, weight_format: str) -> list[Row]:
    if "skipped" in llama:
        return [("vs llama.cpp", "-", llama["skipped"], "")]
    ours, rows = llama["ours"], []
    for n, tok_s in llama["prefill_tok_s"].items():
        rows.append(
            (
                f"vs llama.cpp prefill {n} tok/s",
                _fmt(ours["prefill_tok_s"][n], ".0f"),
                f"llama.cpp {tok_s:.0f}",
                f"{_times_faster(vs['prefill_speedup_by_length'][n])} (spread ours "
                f"{ours['prefill_spread'][n]:.0%}, llama.cpp {llama['prefill_spread'][n]:.0%})",
            )
        )
    for c, ms in llama["decode_ms_per_token"].items():
        rows.append(
            (
                f"vs llama.cpp decode @{c} ms/token",
                _fmt(ours["decode_ms_per_token"][c]),
                f"llama.cpp {ms:.1f}",
                f"{_times_faster(vs['decode_speedup_by_context'][c])} (spread ours "
                f"{ours['decode_spread'][c]:.0%}, llama.cpp {llama['decode_spread'][c]:.0%})",
            )
        )
    rows.append(
        (
            "  weights",
            weight_format,
            f"llama.cpp: the GGUF's own {llama['weights'] or '(unknown type)'}",
            f"llama-cpp-python {llama['version']}, {llama['rounds']} rounds",
        )
    )
    return rows


def _format_rows(formats: Json) -> list[Row]:
    rows = []
    for fmt, entry in formats.items():
        if fmt in ("fp32", "skipped"):
            continue
        rows.append(
            (
                f"{fmt} decode ms/token",
                _fmt(entry["decode_ms"]),
                f"fp32 {entry['fp32_decode_ms']:.1f}, floor {entry['floor_decode_ms']:.1f}",
                f"{entry['speedup_vs_fp32']:.2f}x fp32",
            )
        )
        rows.append(
            (
                f"{fmt} gate_up kernel GB/s (cache-hot)",
                _fmt(entry["gate_up_gemv_gbs"]),
                f"fp32 {formats['fp32']['gate_up_gemv_gbs']:.1f}",
                "",
            )
        )
        rows.append(
            (
                f"{fmt} decode-path logits vs fp32",
                f"max {entry['max_abs_logit_diff']:.3f}",
                f"argmax {entry['argmax_agreement']:.1%}",
                f"KL {entry['kl_mean']:.2e}",
            )
        )
    if "skipped" in formats:
        rows.append(("weight formats skipped", "-", formats["skipped"], ""))
    return rows


def kernel_paths(model: LlamaModel) -> dict[str, int]:
    """Which implementation each linear layer took (make_linear picks by format, device and oneDNN's presence);
    a quantized format's layers count twice (their fp32 linears for prefill, their decode graphs), and the
    decode step's graph (CPU) once."""
    parts = [
        model.lm_head,
        *(part for layer in model.layers for part in (layer.qkv, layer.o, layer.gate_up, layer.down)),
        *(layer.decode for layer in model.layers if layer.decode is not None),
        *([model.step] if model.step is not None else []),
    ]
    return dict(Counter(type(part).__name__ for part in parts))


def print_table(results: Json) -> None:
    machine, model = results["machine"], results["model"]
    print(
        f"{machine['cpu_model']} ({machine['cpu_count']} CPUs; ISA {' '.join(machine['isa']) or 'n/a'}; torch's "
        f"kernels for {machine['cpu_capability']}); {model['weight_format']} linears: "
        + ", ".join(f"{count} {name}" for name, count in model["kernels"].items())
    )
    rows: list[Row] = [
        ("measure", "ours", "floor / peer", "ratio"),
        *_floor_rows(results["floor"]),
        *_speed_rows(results),
        *_format_rows(results["weight_formats"]),
        *_transformers_rows(results["vs_transformers"]),
        *_llamacpp_rows(results["llamacpp"], results["vs_llamacpp"], results["model"]["weight_format"]),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    busy = {name: load for name, load in results["machine"]["others_cpu"].items() if load and load > 0.1}
    if busy:
        print(
            "\nWARNING: other processes were busy during "
            + ", ".join(f"{k} ({v:.0%} of the CPUs)" for k, v in busy.items())
            + ": with 2 threads on 2 cores their figures can be several times too slow"
        )
    print_targets(results["targets"])


# -- entry point ------------------------------------------------------------------------------------
class _Sections:
    """Runs the sections in order; records each one's failure (if optional) and the others' CPU load during it."""

    def __init__(self, results: Json) -> None:
        self.results = results
        self.monitor = floors.CpuMonitor()
        self.others_cpu: dict[str, float | None] = {}

    def run(self, name: str, fn: Callable[[], Any], *, optional: bool = False) -> Any:
        self.monitor.lap()
        try:
            return fn()
        except Exception as exc:
            if not optional:
                raise
            log(f"{name} failed: {type(exc).__name__}: {exc}")  # one broken part costs no others
            self.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            load = self.others_cpu[name] = self.monitor.lap()
            if load is not None and load > 0.1:
                log(f"  note: other processes used {load:.0%} of the CPUs during {name}: its figures are suspect")


def run_engine_bench(args: argparse.Namespace) -> int:
    started = restart_clock()  # progress lines count from the start of this run
    plan = QUICK if args.quick else FULL
    setup = load_setup(args)
    config = setup.model.config
    results: Json = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": bool(args.quick),
        "machine": machine_info(setup.device),
        "model": {
            "name": config.name,
            "weight_format": setup.model.weight_format,
            "dtype": str(setup.dtype),
            "layer_params": floors.layer_params(config),
            "vocab_size": config.vocab_size,
            "kernels": kernel_paths(setup.model),
        },
    }
    sections = _Sections(results)
    results["floor"] = sections.run("floors", lambda: bench_floors(setup, plan))
    prefill, longest = sections.run("prefill", lambda: bench_prefill(setup, plan, results["floor"]))
    results.update(prefill)
    decode, caches = sections.run("decode", lambda: bench_decode(setup, plan, longest))
    results.update(decode)
    cache = caches[plan.main_context]
    results.update(sections.run("batch", lambda: bench_batch(setup, plan, caches[plan.batch_context])))
    if plan.engine_batch:
        results.update(sections.run("engine_batch", lambda: bench_engine_batch(setup, plan), optional=True) or {})
    bandwidth = results["floor"]["bandwidth_gbs"]
    results["weight_formats"] = (
        sections.run("weight_formats", lambda: bench_formats(setup, plan, cache, bandwidth), optional=True) or {}
    )
    results["vs_transformers"] = sections.run(
        "vs_transformers", lambda: bench_transformers(args, setup, plan, cache), optional=True
    ) or {"skipped": "failed: see errors"}
    results["llamacpp"] = sections.run("llamacpp", lambda: bench_llamacpp(args, setup, plan), optional=True) or {
        "skipped": "failed: see errors"
    }
    results["vs_llamacpp"] = llama_cpp_engine.speedups(results["llamacpp"], plan.main_context)
    results["spread"] = collect_spreads(results)
    results["targets"] = evaluate_targets(results, plan)
    results["machine"].update(loadavg_end=os.getloadavg()[0], others_cpu=sections.others_cpu)
    results["elapsed_s"] = time.perf_counter() - started
    print_table(results)
    sys.stdout.flush()  # the table before the last progress line, when both go to one terminal or file
    save_json(args.json_path, results, log)
    return 0
