"""`kvmesh bench suffix`: SuffixDecoding speculation on agent-loop workloads, with and without, side by side.

For each workload (bench/workloads/suffix/*.json, schema in the README there) three engines share one
model: `off` (no speculation), `cold` (speculation, trees empty at the start) and `warm` (speculation,
after the workload's warmup sessions filled the global trees). The engines take turns call by call
(each feeding its own previous output forward), so machine drift hits them alike. Reported per
workload: decode tokens/s and the speedups over `off`, accepted draft tokens per verify, drafted vs
accepted, draft overhead per step, per-stage speedups, and whether all outputs are token-identical
(with the top-1/top-2 logit margin where they are not).
Before the workloads, the cost of one verify forward of 1 + k rows is measured against a decode step;
from its line and the tokens each step yielded, `speedup_estimate` predicts the speedup independently of
wall-clock noise (a cross-check for this shared machine). A batched pass submits the first stage of all
sessions at once (continuous batching: speculation must not cost throughput there).
The prefix cache is off in all engines: it would reuse prompts differently in each and blur the
comparison; prefill is reported apart from decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.speculation import SpeculationConfig, tree_inputs
from kvmesh.workers.suffix_cache import Draft, SuffixCacheConfig
from kvmesh.workers.tokenizer import Tokenizer

from . import floors
from .bench_common import load_setup, log, machine_info
from .json_report import save_json
from .workload import Call, Workload, run_call, run_session, shipped_workloads

Json = dict[str, Any]
TARGET_REPETITIVE = 2.0  # decode speedup on repetitive workloads
TARGET_CONTROL = 0.95  # and at least this on the control


@dataclass(frozen=True)
class Plan:
    sessions: int | None  # None = all
    warmup: int | None
    max_tokens: int | None
    cost_context: int
    cost_rows: tuple[int, ...]
    cost_repeats: int


FULL = Plan(None, None, None, cost_context=512, cost_rows=(1, 2, 3, 5, 9, 17, 33), cost_repeats=9)
QUICK = Plan(1, 1, 16, cost_context=128, cost_rows=(1, 5, 17), cost_repeats=3)


def measure_verify_cost(model: LlamaModel, plan: Plan) -> Json:
    """ms of one forward of n rows (a pending token + a chain draft of n - 1) after cost_context tokens."""
    cache = model.new_cache(capacity=plan.cost_context + max(plan.cost_rows) + 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (plan.cost_context + 64,), generator=gen)
    model.forward(ForwardBatch.single(cache, ids[: plan.cost_context]))
    times: dict[int, list[float]] = {n: [] for n in plan.cost_rows}
    for repeat in range(plan.cost_repeats + 1):  # rows interleaved per repeat; the first round warms up
        for n in plan.cost_rows:
            draft = Draft(tokens=ids[-(n - 1) :].tolist() if n > 1 else [], parents=list(range(-1, n - 2)))
            positions, mask = tree_inputs(draft, cache.length, model.device)
            batch = ForwardBatch.single(
                cache,
                [int(ids[0]), *draft.tokens],
                positions=positions,
                attn_mask=mask if n > 1 else None,
                all_logits=True,
            )
            start = time.perf_counter()
            model.forward(batch)
            floors.sync(model.device)
            if repeat:
                times[n].append(time.perf_counter() - start)
            cache.truncate(plan.cost_context)
    ms = {n: 1000 * statistics.median(t) for n, t in times.items()}
    slope, intercept = _line(list(ms), list(ms.values()))
    return {
        "context": plan.cost_context,
        "ms": {str(n): v for n, v in ms.items()},
        "over_decode": {str(n): v / ms[1] for n, v in ms.items()},
        "line_ms": {"fixed": intercept, "per_row": slope},
    }


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


def _engine(model: LlamaModel, tokenizer: Tokenizer, speculation: SpeculationConfig | None) -> Engine:
    return Engine(model, tokenizer, EngineConfig(prefix_cache=None, speculation=speculation))


def _summary(calls: list[Call], before: Any, engine: Engine, line: Json) -> Json:
    """Decode speed and speculation figures of one engine over its calls (stats: the delta since `before`).

    line: the verify-cost line (ms = fixed + per_row * rows) for the cost-model speedup estimate.
    """
    stats = [c.completion.stats for c in calls]
    decode_tokens = sum(s.output_tokens - 1 for s in stats)
    decode_s = sum(s.finish_s - s.first_token_s for s in stats if s.finish_s and s.first_token_s)
    out: Json = {
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s else None,
        "prefill_s": sum(s.ttft_s or 0.0 for s in stats),
        "output_tokens": sum(s.output_tokens for s in stats),
    }
    if engine.speculator is None:
        return out
    now = engine.speculator.stats
    delta = {f.name: getattr(now, f.name) - getattr(before, f.name) for f in dataclasses.fields(now)}
    steps = decode_tokens - delta["accepted"]  # forwards in the decode phase: each yields 1 + accepted
    out.update(
        verify_steps=delta["verify_steps"],
        drafted=delta["drafted"],
        accepted=delta["accepted"],
        mean_accepted=delta["accepted"] / delta["verify_steps"] if delta["verify_steps"] else 0.0,
        acceptance_rate=delta["accepted"] / delta["drafted"] if delta["drafted"] else None,
        decode_steps=steps,
        tokens_per_step=decode_tokens / steps if steps else None,
        draft_ms_per_step=1000 * delta["draft_s"] / steps if steps else None,
        update_ms_per_step=1000 * delta["update_s"] / steps if steps else None,
        cost_model=engine.speculator.cost.as_dict(),
    )
    if steps:  # plain: decode_tokens one-row steps; speculative: `steps` steps of 1 + draft rows, + overhead
        a, b = line["fixed"], line["per_row"]
        overhead = 1000 * (delta["draft_s"] + delta["update_s"])
        out["speedup_estimate"] = decode_tokens * (a + b) / (a * steps + b * (steps + delta["drafted"]) + overhead)
    return out


def _batched(model: LlamaModel, tokenizer: Tokenizer, speculation: SpeculationConfig, workload: Workload) -> Json:
    """The first stage of every session (up to 8) submitted at once, on a plain and a speculating engine.

    Both are fresh: the workload's engines have answered these very prompts (a tree would hold the answers),
    and an engine's first requests pay for first touching its KV slots, which must hit both alike.
    """
    engines = {"off": _engine(model, tokenizer, None), "spec": _engine(model, tokenizer, speculation)}
    stage_name = workload.sessions[0].chain[0]
    stage = workload.stages[stage_name]
    sessions = [s for s in workload.sessions if s.chain[0] == stage_name][:8]
    sampling = SamplingParams(max_tokens=workload.max_tokens)
    out: Json = {"stage": stage_name, "requests": len(sessions)}
    tokens: dict[str, list[list[int]]] = {}
    for name, engine in engines.items():
        prompts = [engine.chat_prompt(stage.render(s.input, ""), system=workload.system) for s in sessions]
        before = engine.speculator.stats.drafted if engine.speculator else 0
        started = time.perf_counter()
        completions = engine.generate(prompts, sampling, role=stage.role)
        out[f"{name}_s"] = time.perf_counter() - started
        out[f"{name}_tok_s"] = sum(len(c.token_ids) for c in completions) / out[f"{name}_s"]
        if engine.speculator:
            out["drafted"] = engine.speculator.stats.drafted - before
            out["accepted"] = sum(c.stats.accepted_tokens for c in completions)
        tokens[name] = [c.token_ids for c in completions]
    out["speedup"] = out["off_s"] / out["spec_s"]  # whole calls, prefill included (the same work in both)
    out["identical"] = tokens["off"] == tokens["spec"]
    return out


def _divergence(model: LlamaModel, reference: Call, other: Call) -> Json:
    """Where two outputs of the same call first differ, and how close the reference's top-2 logits were."""
    a, b = reference.completion.token_ids, other.completion.token_ids
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    with torch.inference_mode():
        logits = model.forward(ForwardBatch.single(model.new_cache(), reference.prompt_ids + a[:k]))[0]
    top = logits.topk(2)
    return {
        "session": reference.session,
        "stage": reference.stage,
        "position": k,
        "plain": a[k : k + 3],
        "speculative": b[k : k + 3],
        "top2_margin": float(top.values[0] - top.values[1]),
    }


def run_workload(
    model: LlamaModel, tokenizer: Tokenizer, workload: Workload, speculation: SpeculationConfig, line: Json
) -> Json:
    engines = {
        "off": _engine(model, tokenizer, None),
        "cold": _engine(model, tokenizer, speculation),
        "warm": _engine(model, tokenizer, speculation),
    }
    started = time.perf_counter()
    for index, session in enumerate(workload.warmup):
        run_session(engines["warm"], workload, session, -1 - index)
    warmup_s = time.perf_counter() - started
    before = {name: dataclasses.replace(e.speculator.stats) for name, e in engines.items() if e.speculator}
    calls: dict[str, list[Call]] = {name: [] for name in engines}
    monitor = floors.CpuMonitor()
    for index, session in enumerate(workload.sessions):
        for position, stage in enumerate(session.chain):  # engines take turns call by call: drift hits all alike
            for name, engine in engines.items():
                previous = calls[name][-1].completion.text if position else ""
                calls[name].append(run_call(engine, workload, session, index, stage, previous))
        log(
            f"  {workload.name} session {index + 1}/{len(workload.sessions)}: "
            + ", ".join(f"{n} {sum(c.completion.stats.output_tokens for c in calls[n])} tok" for n in engines)
        )
    others = monitor.lap()
    result: Json = {name: _summary(calls[name], before.get(name), e, line) for name, e in engines.items()}
    off = result["off"]["decode_tok_s"]
    divergences = [
        _divergence(model, ref, other)
        for name in ("cold", "warm")
        for ref, other in zip(calls["off"], calls[name], strict=True)
        if ref.completion.token_ids != other.completion.token_ids
    ]
    by_stage: Json = {}
    for stage in workload.stages:
        rates = {}
        for name in engines:
            picked = [c.completion.stats for c in calls[name] if c.stage == stage]
            seconds = sum(s.finish_s - s.first_token_s for s in picked)
            rates[name] = sum(s.output_tokens - 1 for s in picked) / seconds if seconds else None
        if rates["off"]:
            by_stage[stage] = {f"speedup_{n}": rates[n] / rates["off"] if rates[n] else None for n in ("cold", "warm")}
    result.update(
        description=workload.description,
        repetitive=workload.repetitive,
        calls=len(calls["off"]),
        speedup=result["warm"]["decode_tok_s"] / off if off else None,
        speedup_cold=result["cold"]["decode_tok_s"] / off if off else None,
        mean_accepted=result["warm"]["mean_accepted"],
        mean_accepted_cold=result["cold"]["mean_accepted"],
        identical=not divergences,
        divergences=divergences,
        by_stage=by_stage,
        warmup_s=warmup_s,
        others_cpu=others,
        speedup_estimate=result["warm"].get("speedup_estimate"),
    )
    result["batched"] = _batched(model, tokenizer, speculation, workload)
    result["identical"] = result["identical"] and result["batched"]["identical"]
    return result


def _targets(workloads: Json) -> Json:
    targets = {}
    for name, w in workloads.items():
        goal = TARGET_REPETITIVE if w["repetitive"] else TARGET_CONTROL
        value = w["speedup"]
        targets[f"{name}.speedup"] = {"value": value, "target": goal, "pass": value is not None and value >= goal}
        targets[f"{name}.identical"] = {"value": w["identical"], "target": True, "pass": w["identical"]}
    return targets


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: Json) -> None:
    cost = results["verify_cost"]
    print(
        f"\nverify cost @{cost['context']} (ms; x decode step): "
        + ", ".join(f"{n} rows {v:.1f} ({cost['over_decode'][n]:.2f}x)" for n, v in cost["ms"].items())
    )
    header = (
        "workload",
        "off tok/s",
        "cold tok/s",
        "warm tok/s",
        "speedup c/w (est w)",
        "acc/verify c/w",
        "accept rate w",
        "draft+upd ms/step w",
        "identical",
    )
    print("\n" + " | ".join(header))
    for name, w in results["workloads"].items():
        cold, warm = w["cold"], w["warm"]
        overhead = (warm["draft_ms_per_step"] or 0) + (warm["update_ms_per_step"] or 0)
        print(
            " | ".join(
                [
                    name,
                    _fmt(w["off"]["decode_tok_s"], ".1f"),
                    _fmt(cold["decode_tok_s"], ".1f"),
                    _fmt(warm["decode_tok_s"], ".1f"),
                    f"{_fmt(w['speedup_cold'])} / {_fmt(w['speedup'])} ({_fmt(w['speedup_estimate'])})",
                    f"{_fmt(cold['mean_accepted'])} / {_fmt(warm['mean_accepted'])}",
                    _fmt(warm["acceptance_rate"]),
                    _fmt(overhead),
                    str(w["identical"]),
                ]
            )
        )
        for stage, s in w["by_stage"].items():
            print(f"    stage {stage}: speedup cold {_fmt(s['speedup_cold'])}, warm {_fmt(s['speedup_warm'])}")
        b = w["batched"]
        print(
            f"    batched ({b['requests']} x {b['stage']} at once): off {b['off_tok_s']:.1f} tok/s, speculating "
            f"{b['spec_tok_s']:.1f} tok/s ({_fmt(b['speedup'])}x), {b.get('accepted', 0)}/{b.get('drafted', 0)} "
            f"draft tokens accepted, identical {b['identical']}"
        )
        for d in w["divergences"]:
            print(
                f"    DIVERGED session {d['session']} {d['stage']} at token {d['position']}: plain {d['plain']} "
                f"vs speculative {d['speculative']}, top-1/top-2 logit margin {d['top2_margin']:.2e}"
            )
        if w["others_cpu"] is not None and w["others_cpu"] > 0.1:
            print(f"    note: other processes used {w['others_cpu']:.0%} of the CPUs: figures are suspect")
    print("\ntargets:")
    for name, t in results["targets"].items():
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {name}: {t['value']} (target {t['target']})")


def speculation_config(args: argparse.Namespace) -> SpeculationConfig:
    base = SuffixCacheConfig()
    suffix = dataclasses.replace(
        base,
        spec_factor=args.spec_factor if args.spec_factor is not None else base.spec_factor,
        max_spec_tokens=args.max_spec_tokens or base.max_spec_tokens,
        tree_drafts=not args.chain,
    )
    return SpeculationConfig(suffix=suffix, adaptive=not args.no_adaptive)


def run_suffix_bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    paths = args.workloads or shipped_workloads()
    workloads = [Workload.load(p) for p in paths]  # a bad file fails before the model loads
    if plan.sessions is not None:
        workloads = [w.shortened(plan.sessions, plan.warmup or 0, plan.max_tokens or w.max_tokens) for w in workloads]
    speculation = speculation_config(args)
    setup = load_setup(args)
    tokenizer = setup.raw.tokenizer
    results: Json = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": bool(args.quick),
        "machine": machine_info(setup.device),
        "model": setup.model.config.name,
        "speculation": dataclasses.asdict(speculation),
        "workload_files": [str(p) for p in paths],
    }
    log(f"verify cost: forwards of {plan.cost_rows} rows at context {plan.cost_context}")
    results["verify_cost"] = measure_verify_cost(setup.model, plan)
    results["workloads"] = {}
    for workload in workloads:
        log(
            f"workload {workload.name}: {len(workload.sessions)} sessions (+{len(workload.warmup)} warmup), "
            f"max_tokens {workload.max_tokens}"
        )
        results["workloads"][workload.name] = run_workload(
            setup.model, tokenizer, workload, speculation, results["verify_cost"]["line_ms"]
        )
    results["targets"] = _targets(results["workloads"])
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    results["elapsed_s"] = time.perf_counter() - started
    print_table(results)
    sys.stdout.flush()
    save_json(args.json_path, results, log)
    return 0
