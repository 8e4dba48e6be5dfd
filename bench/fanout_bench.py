"""`kvmesh bench fanout`: agents decoding over one shared prefix, each with its own copy of its KV and with the
prefix read in place (shared), side by side in one run.

The setting is a fan-out: N agents get the same long context (documents) and a short question each, and decode
greedily. The context is prefilled once, as a request of its own, so it is in the prefix cache; every agent then
hits it. With `shared_prefix_min_tokens=None` the hit is copied into each agent's KV (N copies to hold and to
read every step); with sharing on, the agents read the tree's one copy in place. Both variants share one loaded
model, run without speculation (every step a plain decode) and must produce the same tokens.

A second, cold setting starts from an empty prefix cache: the agents arrive together over the new context. Copied
(today's engine), each prefills it; shared, the others wait while the first prefills it, then read its KV.

Beside each decode step stands its floor: the bytes a step must read (the weights once, plus the KV each variant
attends over) at the copy bandwidth measured in the same run. Progress lines go to stderr, a table to stdout,
and with --json the results to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvmesh.workers.chat_frame import ChatFramer
from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.prefix_cache import PrefixMatch
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.tokenizer import Tokenizer

from . import floors
from .bench_common import (
    Json,
    Setup,
    load_setup,
    log,
    machine_info,
    median_spread,
    print_targets,
    restart_clock,
    target_entry,
)
from .json_report import save_json

# The issue's targets: sharing decodes >= 1.5x faster, holds <= 0.3 of the copies' KV, changes no token, and a
# 2K-token prefix hit costs <= 1 ms.
TARGET_SPEEDUP = 1.5
TARGET_KV_RATIO = 0.3
TARGET_HIT_MS = 1.0

SHARE_AT = 256  # the shared variant's shared_prefix_min_tokens: hits this long are read in place
OVERHANG = 5  # context tokens past the last whole block: the hit stays block aligned, the tail is recomputed
# the documents every agent reads (about 4,500 tokens): real sentences, cut to the prefix length
DOCUMENTS = Path(__file__).parent / "workloads" / "blend" / "retrieval.json"
TOPICS = (
    "the rivers",
    "the mayors",
    "the schools and libraries",
    "the food and the markets",
    "the railways and roads",
    "the festivals",
    "the farms and what they grow",
    "the old buildings",
)


@dataclass(frozen=True)
class Plan:
    """FULL is the issue's setting; QUICK the CI smoke test's (well under a minute)."""

    agents: int
    prefix_tokens: int  # the shared hit: a multiple of the prefix cache's block size
    decode_tokens: int  # each agent decodes exactly this many (ignore_eos)
    hit_repeats: int  # timed prefix hits per variant (median)
    rounds: int  # runs of each variant, in the order copied, shared, shared, copied, ... (the machine drifts)
    floor_sizes: floors.FloorSizes


FULL = Plan(agents=8, prefix_tokens=2048, decode_tokens=64, hit_repeats=9, rounds=2, floor_sizes=floors.FloorSizes())
QUICK = Plan(agents=3, prefix_tokens=256, decode_tokens=8, hit_repeats=5, rounds=1, floor_sizes=floors.QUICK_SIZES)
VARIANTS: dict[str, int | None] = {"copied": None, "shared": SHARE_AT}  # name -> shared_prefix_min_tokens


def build_prompts(tokenizer: Tokenizer, plan: Plan) -> tuple[list[int], list[list[int]]]:
    """The shared context (prefix_tokens + OVERHANG ids: a system message and documents, cut mid-text) and each
    agent's prompt: the context, its own question, and the chat frame's end (the assistant's turn opened)."""
    workload = json.loads(DOCUMENTS.read_text())
    head, tail = ChatFramer(tokenizer).frame(workload["system"])
    documents = "".join(
        workload["chunk_template"].format(index=i + 1, chunk=doc["text"]) for i, doc in enumerate(workload["documents"])
    )
    context = (head + tokenizer.encode(documents))[: plan.prefix_tokens + OVERHANG]
    if len(context) < plan.prefix_tokens + OVERHANG:
        raise ValueError(f"{DOCUMENTS} holds only {len(context)} tokens; the plan needs {plan.prefix_tokens}")
    prompts = [
        context
        + tokenizer.encode(f"\n\nAgent {i + 1}: list what the documents above say about {TOPICS[i % len(TOPICS)]}.")
        + tail
        for i in range(plan.agents)
    ]
    return context, prompts


def prefix_hit_ms(engine: Engine, prompt: list[int], hit: int, shared: bool, repeats: int) -> float:
    """Median ms of one prefix hit of `hit` tokens: match plus load into a fresh KV slot (a copy), or match plus
    share (views of the tree's tensors). The first repeat is a warm-up."""
    cache, times = engine.prefix_cache, []
    assert cache is not None
    for _ in range(repeats + 1):
        slot = None if shared else engine.kv_slots.acquire()
        match: PrefixMatch | None = None
        start = time.perf_counter()
        try:
            match = cache.match(prompt, max_tokens=hit)
            if slot is None:
                cache.share(match)
            else:
                cache.load(match, slot)
            floors.sync(engine.model.device)
            times.append(time.perf_counter() - start)
            if match.num_tokens != hit:
                raise RuntimeError(f"the prefix cache served {match.num_tokens} tokens, not {hit}: no full hit to time")
        finally:
            if match is not None:
                cache.release(match)
            if slot is not None:
                slot.free_slot()
    return 1000 * statistics.median(times[1:])


def run_variant(setup: Setup, plan: Plan, name: str, context: list[int], prompts: list[list[int]]) -> Json:
    """One fresh engine: prefill the context, run the agents to the end timing every step, then time a hit."""
    n = plan.agents
    config = EngineConfig(speculation=None, shared_prefix_min_tokens=VARIANTS[name])
    engine = Engine(setup.model, setup.raw.tokenizer, config)
    log(f"{name}: prefilling the {len(context)}-token context into the prefix cache")
    engine.generate([context], SamplingParams(max_tokens=1))
    sampling = SamplingParams(temperature=0.0, max_tokens=plan.decode_tokens, ignore_eos=True)
    ids = [engine.add_request(prompt, sampling) for prompt in prompts]
    log(f"{name}: {n} agents decode {plan.decode_tokens} tokens each")
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    hits: dict[str, int] = {}
    times: list[float] = []
    held = 0
    while engine.has_work():
        running = engine.scheduler.running
        # a timed step decodes all N and nothing else: no prompt chunk rides along
        pure = not engine.scheduler.waiting and len(running) == n and not any(s.in_prefill for s in running)
        start = time.perf_counter()
        events = engine.step()
        floors.sync(setup.device)
        if pure:
            times.append(time.perf_counter() - start)
        if len(engine.scheduler.running) == n:  # the most KV is held just before they all finish together
            held = max(held, engine.held_kv_bytes())
        for event in events:
            if event.token_id is not None:
                outputs[event.request_id].append(event.token_id)
            if event.finished:
                if event.finish_reason != "length":
                    raise RuntimeError(f"{name}: {event.request_id} ended with {event.finish_reason}: {event.error}")
                assert event.stats is not None
                hits[event.request_id] = event.stats.prefix_hit_tokens
    step_ms = 1000 * statistics.median(times)
    log(f"  {step_ms:.1f} ms/step over {len(times)} steps; {held / 1e6:.0f} MB of KV held")
    hit_ms = prefix_hit_ms(engine, prompts[0], plan.prefix_tokens, name == "shared", plan.hit_repeats)
    log(f"  a {plan.prefix_tokens}-token prefix hit: {hit_ms:.3f} ms")
    return {
        "decode_step_ms": step_ms,
        "decode_steps": len(times),
        "step_times": times,
        "kv_bytes": held,
        "prefix_hit_tokens": [hits[i] for i in ids],
        "prefix_hit_ms": hit_ms,
        "outputs": [outputs[i] for i in ids],
    }


def run_cold(setup: Setup, plan: Plan, name: str, prompts: list[list[int]]) -> Json:
    """A fresh engine, nothing cached: the agents arrive together over the new context. Copied, each prefills
    it; shared, the others wait for the first one's prefill and read its KV."""
    config = EngineConfig(speculation=None, shared_prefix_min_tokens=VARIANTS[name])
    engine = Engine(setup.model, setup.raw.tokenizer, config)
    sampling = SamplingParams(temperature=0.0, max_tokens=plan.decode_tokens, ignore_eos=True)
    log(f"{name}: {plan.agents} agents arrive together over the uncached context")
    start = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    computed = sum(len(p) - c.stats.prefix_hit_tokens for p, c in zip(prompts, completions, strict=True))
    log(f"  {wall:.2f} s to the last token; {computed} prompt tokens computed")
    return {
        "wall_s": wall,
        "prompt_tokens_computed": computed,
        "ttft_max_s": max(c.stats.ttft_s or 0.0 for c in completions),
        "outputs": [c.token_ids for c in completions],
    }


def pool_rounds(name: str, runs: list[Json]) -> Json:
    """A variant's rounds as one: step times pooled, the most KV held, the median hit; every round must have
    produced the same tokens (greedy, same engine settings)."""
    if any(run["outputs"] != runs[0]["outputs"] for run in runs):
        raise RuntimeError(f"{name}: the rounds produced different tokens: the engine is not deterministic here")
    times = [t for run in runs for t in run["step_times"]]
    return runs[0] | {
        "decode_step_ms": 1000 * statistics.median(times),
        "decode_steps": len(times),
        # how far the rounds disagree; with one round, how far its steps did
        "decode_step_spread": median_spread([run["decode_step_ms"] for run in runs] if len(runs) > 1 else times)[1],
        "decode_step_ms_rounds": [run["decode_step_ms"] for run in runs],
        "kv_bytes": max(run["kv_bytes"] for run in runs),
        "prefix_hit_ms": statistics.median(run["prefix_hit_ms"] for run in runs),
        "cold": {
            "wall_s": statistics.median(run["cold"]["wall_s"] for run in runs),
            "wall_s_rounds": [run["cold"]["wall_s"] for run in runs],
            "prompt_tokens_computed": runs[0]["cold"]["prompt_tokens_computed"],
            "ttft_max_s": statistics.median(run["cold"]["ttft_max_s"] for run in runs),
        },
    }


def floor_step_ms(setup: Setup, plan: Plan, prompts: list[list[int]], bandwidth_gbs: float, shares: bool) -> Json:
    """What one decode step must read, each variant: the weights once, and the KV every agent attends over at
    the decode's mean length (the prompt plus half the output); a shared prefix once, where the engine did share
    it (`shares`: quantized models copy every hit)."""
    config, model = setup.model.config, setup.model
    kv_per_token = 2 * config.num_layers * config.kv_size * model.dtype.itemsize  # keys and values
    contexts = [len(prompt) + plan.decode_tokens / 2 for prompt in prompts]
    tokens = {
        "copied": sum(contexts),
        "shared": plan.prefix_tokens + sum(c - plan.prefix_tokens for c in contexts) if shares else sum(contexts),
    }
    weight_bytes = floors.decode_weight_bytes(model)
    read = {name: weight_bytes + kv_per_token * t for name, t in tokens.items()}
    return {
        "copy_bandwidth_gbs": bandwidth_gbs,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "read_bytes_per_step": read,
        "floor_step_ms": {name: 1000 * b / (bandwidth_gbs * 1e9) for name, b in read.items()},
    }


def evaluate_targets(results: Json) -> Json:
    kv, hit = results["kv_bytes"], results["prefix_hit_ms"]
    n, prefix = results["agents"], results["shared_prefix_tokens"]
    return {
        "speedup": target_entry(
            results["speedup"], TARGET_SPEEDUP, True, f"decode step ms, copied / shared, {n} agents"
        ),
        "kv_ratio": target_entry(kv["shared"] / kv["copied"], TARGET_KV_RATIO, False, "KV bytes held, shared / copied"),
        "identical": target_entry(
            results["identical_agents"] / n, 1.0, True, "agents whose greedy tokens are the same in both variants"
        ),
        "prefix_hit_ms": target_entry(hit["shared"], TARGET_HIT_MS, False, f"match + share of a {prefix}-token hit"),
    }


def print_table(results: Json) -> None:
    cold = results["cold"]
    step, kv, hit, floor = (
        results["decode_step_ms"],
        results["kv_bytes"],
        results["prefix_hit_ms"],
        results["floor_step_ms"],
    )
    model, device = results["model"], results["machine"]["device"]
    print(
        f"{results['agents']} agents x {results['decode_tokens']} tokens over a {results['shared_prefix_tokens']}"
        f"-token shared prefix ({model['name']}, {model['weight_format']} on {device})"
    )
    rows = [
        ("measure", "copied", "shared", "shared / copied"),
        ("decode step ms", f"{step['copied']:.1f}", f"{step['shared']:.1f}", f"{1 / results['speedup']:.2f}"),
        ("  floor ms", f"{floor['copied']:.1f}", f"{floor['shared']:.1f}", ""),
        *[
            (f"  round {i + 1} ms", f"{a:.1f}", f"{b:.1f}", "")
            for i, (a, b) in enumerate(
                zip(results["decode_step_ms_rounds"]["copied"], results["decode_step_ms_rounds"]["shared"], strict=True)
            )
        ],
        ("KV held MB", f"{kv['copied'] / 1e6:.0f}", f"{kv['shared'] / 1e6:.0f}", f"{kv['shared'] / kv['copied']:.2f}"),
        ("prefix hit ms", f"{hit['copied']:.3f}", f"{hit['shared']:.3f}", f"{hit['shared'] / hit['copied']:.2f}"),
        ("cold: all done s", f"{cold['copied']['wall_s']:.2f}", f"{cold['shared']['wall_s']:.2f}", ""),
        ("  prompt tokens computed", *(f"{cold[v]['prompt_tokens_computed']}" for v in ("copied", "shared")), ""),
        ("  slowest first token s", *(f"{cold[v]['ttft_max_s']:.2f}" for v in ("copied", "shared")), ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"floor: the weights plus the KV each step attends over, at {results['floor']['copy_bandwidth_gbs']:.1f} GB/s "
        f"(copy); identical outputs: {results['identical_agents']}/{results['agents']} agents (cold: "
        f"{'the same' if results['cold_identical'] else 'NOT the same'})"
    )
    print_targets(results["targets"])


def run_fanout_bench(args: argparse.Namespace) -> int:
    started = restart_clock()
    plan = QUICK if args.quick else FULL
    if args.agents is not None:
        if args.agents < 1:
            raise SystemExit(f"--agents must be at least 1, got {args.agents}")
        plan = dataclasses.replace(plan, agents=args.agents)
    setup = load_setup(args)
    context, prompts = build_prompts(setup.raw.tokenizer, plan)
    log("floor: copy bandwidth")
    sizes = plan.floor_sizes
    bandwidth = max(floors.copy_bandwidth_gbs(n, setup.device, sizes.repeats) for n in sizes.copy_bytes)
    monitor, others_cpu = floors.CpuMonitor(), {}
    rounds: dict[str, list[Json]] = {name: [] for name in VARIANTS}
    order = [name for i in range(plan.rounds) for name in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1])]
    for name in order:
        monitor.lap()
        rounds[name].append(run_variant(setup, plan, name, context, prompts))
        rounds[name][-1]["cold"] = run_cold(setup, plan, name, prompts)
        gc.collect()  # the engine's KV slots go before the next one's are made
        load = others_cpu[name] = max(others_cpu.get(name, 0.0), monitor.lap() or 0.0)
        if load > 0.1:
            log(f"  note: other processes used {load:.0%} of the CPUs during {name}: its figures are suspect")
    runs = {name: pool_rounds(name, runs) for name, runs in rounds.items()}
    copied, shared = runs["copied"], runs["shared"]
    floor = floor_step_ms(setup, plan, prompts, bandwidth, shares=shared["kv_bytes"] < copied["kv_bytes"])
    log(
        f"floor per decode step (bytes to read / {bandwidth:.1f} GB/s copy bandwidth): "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in floor["floor_step_ms"].items())
    )
    results: Json = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": bool(args.quick),
        "machine": machine_info(setup.device) | {"loadavg_end": os.getloadavg()[0], "others_cpu": others_cpu},
        "model": {
            "name": setup.model.config.name,
            "weight_format": setup.model.weight_format,
            "dtype": str(setup.dtype),
        },
        "agents": plan.agents,
        "shared_prefix_tokens": plan.prefix_tokens,
        "shared_prefix_min_tokens": SHARE_AT,
        "decode_tokens": plan.decode_tokens,
        "prompt_tokens": [len(prompt) for prompt in prompts],
        "prefix_hit_tokens": {name: run["prefix_hit_tokens"] for name, run in runs.items()},
        "kv_bytes": {name: run["kv_bytes"] for name, run in runs.items()},
        "decode_step_ms": {name: run["decode_step_ms"] for name, run in runs.items()},
        "decode_steps": {name: run["decode_steps"] for name, run in runs.items()},
        "decode_step_spread": {name: run["decode_step_spread"] for name, run in runs.items()},
        "decode_step_ms_rounds": {name: run["decode_step_ms_rounds"] for name, run in runs.items()},
        "speedup": copied["decode_step_ms"] / shared["decode_step_ms"],
        "identical": copied["outputs"] == shared["outputs"],
        "identical_agents": sum(a == b for a, b in zip(copied["outputs"], shared["outputs"], strict=True)),
        "prefix_hit_ms": {name: run["prefix_hit_ms"] for name, run in runs.items()},
        "cold": {name: run["cold"] for name, run in runs.items()},
        "cold_speedup": copied["cold"]["wall_s"] / shared["cold"]["wall_s"],
        "cold_identical": rounds["copied"][0]["cold"]["outputs"] == rounds["shared"][0]["cold"]["outputs"],
        "sample_output": setup.raw.tokenizer.decode(shared["outputs"][0]),  # agent 1's reply, shared variant
        "floor": {k: v for k, v in floor.items() if k != "floor_step_ms"},
        "floor_step_ms": floor["floor_step_ms"],
    }
    results["targets"] = evaluate_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    print_table(results)
    sys.stdout.flush()  # the table before the last progress line, when both go to one terminal or file
    save_json(args.json_path, results, log)
    return 0
