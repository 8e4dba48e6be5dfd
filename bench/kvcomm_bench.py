"""`kvmesh bench kvcomm`: KVCOMM beside dense, prefix-only and naive reuse, in one run.

TTFT section (teacher-forced, identical token ids in every mode): each mode is its own in-process
worker (engine + prefix cache + planner) sharing the model, so no mode ever finds another mode's copy of
the same prompt in its prefix cache: `prefix` (exact prefix cache), `dense` (no reuse), `kvcomm`,
`naive` (bases moved into place, no correction; shares kvcomm's segments) and `forced` (kvcomm that
reuses whenever any anchor covers a segment, with its own anchor pool: the calibration data for the
fit thresholds). TTFT includes planning (base KVs, matching, assembly). Fidelity compares each reused
prompt's KV with dense: the next-token distribution (KL, first token) and 32 greedy tokens from it.
Task section: the workload's pipeline over its items in dense / kvcomm / naive, scored.
Workload schema: bench/workloads/kvcomm/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvmesh.agents import Agent, Pipeline, Prompt, Segment, run_locally
from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.engine import Engine
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.reuse_planner import PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.tokenizer import Tokenizer
from kvmesh.workers.worker import WorkerConfig, build_worker

from .bench_common import log, machine_info
from .inprocess_worker import CallResult, InProcessWorker
from .json_report import save_json
from .kv_fidelity import compare, continuation, summarize

Json = dict[str, Any]
WORKLOADS = Path(__file__).parent / "workloads" / "kvcomm"
TTFT_MODES = ("prefix", "dense", "kvcomm", "naive", "forced")
REUSED = {"kvcomm": "kvcomm", "naive": "naive", "forced": "kvcomm"}  # mode -> what its planner reports when it reused
FORCED = MatchConfig(max_distance=math.inf, entropy_gamma=1.0, min_anchors=1)
_WORDS = (
    "the",
    "river",
    "city",
    "market",
    "light",
    "stone",
    "garden",
    "winter",
    "music",
    "letter",
    "bridge",
    "forest",
    "morning",
    "paper",
    "window",
    "travel",
    "simple",
    "quiet",
    "golden",
    "silver",
    "northern",
    "ancient",
    "modern",
    "careful",
    "bright",
    "people",
    "history",
    "science",
    "story",
    "village",
    "harbor",
    "mountain",
    "season",
    "journey",
    "evening",
    "question",
    "answer",
    "number",
    "friend",
    "family",
    "school",
    "road",
    "table",
    "water",
    "fire",
    "cloud",
    "field",
    "color",
    "small",
    "large",
    "early",
    "late",
    "open",
    "close",
    "build",
    "write",
    "read",
    "speak",
    "listen",
    "remember",
    "carry",
    "follow",
    "explain",
    "measure",
    "compare",
    "record",
    "notice",
    "gather",
    "share",
)


def synthetic_text(tokenizer: Tokenizer, tokens: int, seed: int, kind: str = "sentences") -> str:
    """About `tokens` tokens of text: random sentences over a word list, or (the KVCOMM paper's TTFT
    benchmark) a random string of the symbols Δ and Ω."""
    rng = random.Random(seed)
    if kind == "symbols":
        return "".join(rng.choice((" Δ", " Ω")) for _ in range(tokens // 2))  # " Ω" is 2 tokens here
    if kind != "sentences":
        raise ValueError(f"text kind {kind!r}: use 'sentences' or 'symbols'")
    sentences: list[str] = []
    while len(tokenizer.encode(" ".join(sentences))) < tokens:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


# -- fidelity ----------------------------------------------------------------------------------------
def _fidelity(model, dense: CallResult, other: CallResult) -> Json:
    assert dense.prompt_kv is not None and other.prompt_kv is not None and dense.prompt_ids == other.prompt_ids
    reference = continuation(model, dense.prompt_kv, dense.prompt_ids)
    return compare(reference, continuation(model, other.prompt_kv, other.prompt_ids))


# -- TTFT --------------------------------------------------------------------------------------------
def bench_ttft(workers: dict[str, InProcessWorker], spec: Json) -> Json:
    tokenizer, model = workers["dense"].engine.tokenizer, workers["dense"].engine.model
    agents, requests, warmup = int(spec["agents"]), int(spec["requests"]), int(spec.get("warmup_requests", 2))
    seed, kind = int(spec.get("seed", 0)), spec.get("text", "sentences")
    systems = [
        f"You are agent {k + 1}. " + synthetic_text(tokenizer, spec["system_tokens"], seed + k, kind)
        for k in range(agents)
    ]
    ttft: dict[str, list[list[float]]] = {m: [[] for _ in range(agents)] for m in TTFT_MODES}
    served_ttft: list[list[float]] = [[] for _ in range(agents)]
    prompt_tokens = [0] * agents
    fidelity: dict[str, list[Json]] = {mode: [] for mode in REUSED}
    reuse = {"calls": [0, 0], "warm_calls": [0, 0], "tokens": [0, 0], "warm_tokens": [0, 0]}
    for request in range(requests):
        warm = request >= warmup
        query = synthetic_text(tokenizer, spec["query_tokens"], seed + 1000 + request, kind)
        outputs: list[str] = []
        for k in range(agents):
            log(f"ttft: request {request + 1}/{requests}, agent {k + 1}/{agents}")
            parts = [PromptPart("Question:\n"), PromptPart(query, segment_id("query", query), "query")]
            for j, text in enumerate(outputs):
                parts += [
                    PromptPart(f"\n\nAgent {j + 1} said:\n"),
                    PromptPart(text, segment_id(f"agent{j + 1}", text), f"agent{j + 1}"),
                ]
            parts.append(PromptPart(f"\n\nNow respond as agent {k + 1}."))
            calls = {
                mode: workers[mode].call(
                    f"agent{k + 1}",
                    systems[k],
                    parts,
                    "kvcomm" if mode == "forced" else mode,
                    SamplingParams(max_tokens=1),
                    capture=True,
                )
                for mode in TTFT_MODES
            }
            served = calls["kvcomm"].reuse.mode == "kvcomm"
            prompt_tokens[k] = len(calls["dense"].prompt_ids)
            for key, flag in (("calls", True), ("warm_calls", warm)):
                if flag:
                    reuse[key][0] += served
                    reuse[key][1] += 1
            for key, flag in (("tokens", True), ("warm_tokens", warm)):
                if flag:
                    reuse[key][0] += calls["kvcomm"].reuse.reused_tokens
                    reuse[key][1] += prompt_tokens[k]
            if warm:
                for mode in TTFT_MODES:
                    ttft[mode][k].append(calls[mode].stats.ttft_s)
                if served:
                    served_ttft[k].append(calls["kvcomm"].stats.ttft_s)
            for mode, reused in REUSED.items():
                if calls[mode].reuse.mode == reused:
                    row = _fidelity(model, calls["dense"], calls[mode])
                    fidelity[mode].append(row | {"matches": calls[mode].reuse.matches})
            outputs.append(synthetic_text(tokenizer, spec["output_tokens"], seed + 2000 + 10 * request + k, kind))
            for mode in ("kvcomm", "forced"):  # naive reads kvcomm's store
                _publish_forced(workers[mode], f"agent{k + 1}", calls[mode], outputs[-1])
    return {
        "agents": [_agent_row(k, ttft, served_ttft[k], prompt_tokens[k]) for k in range(agents)],
        "reuse_rate_calls": _ratio(reuse["calls"]),
        "reuse_rate_tokens": _ratio(reuse["tokens"]),
        "reuse_rate_calls_warm": _ratio(reuse["warm_calls"]),
        "reuse_rate_tokens_warm": _ratio(reuse["warm_tokens"]),
        "fidelity": {mode: summarize(rows) for mode, rows in fidelity.items()},
        "calibration": _calibration(fidelity["forced"]),
    }


def _calibration(rows: list[Json]) -> list[Json]:
    """Forced reuse grouped by the worst segment's nearest-anchor distance: where does fidelity drop?"""
    bins = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, math.inf]
    table = []
    for low, high in itertools.pairwise(bins):
        group = [r for r in rows if r["matches"] and low <= max(m[0] for m in r["matches"].values()) < high]
        if group:
            table.append({"nearest_from": low, "nearest_to": high, **summarize(group)})
    return table


def _publish_forced(worker: InProcessWorker, agent: str, call: CallResult, text: str) -> None:
    """The teacher-forced output as the agent's response segment: its KV as if this agent had decoded it."""
    assert call.prompt_kv is not None
    tokens = worker.engine.tokenizer.encode(text)
    cache = call.prompt_kv.clone()
    worker.engine.model.forward(ForwardBatch.single(cache, tokens))
    worker.planner.publish(agent, tokens, cache.slice(len(call.prompt_ids)), len(call.prompt_ids))


def _agent_row(k: int, ttft: dict[str, list[list[float]]], served: list[float], prompt_tokens: int) -> Json:
    mean = {mode: statistics.mean(ttft[mode][k]) if ttft[mode][k] else None for mode in TTFT_MODES}
    return {
        "agent": k + 1,
        "prompt_tokens": prompt_tokens,
        **{f"ttft_{mode}_s": mean[mode] for mode in TTFT_MODES},
        "ttft_kvcomm_served_s": statistics.mean(served) if served else None,
        "speedup": mean["dense"] / mean["kvcomm"] if mean["dense"] and mean["kvcomm"] else None,
        "speedup_vs_prefix": mean["prefix"] / mean["kvcomm"] if mean["prefix"] and mean["kvcomm"] else None,
    }


def _ratio(pair: list[int]) -> float | None:
    return pair[0] / pair[1] if pair[1] else None


# -- task ----------------------------------------------------------------------------------------------
def bench_task(workers: dict[str, InProcessWorker], task: Json, limit: int | None) -> Json:
    pipeline = Pipeline("task", [Agent(**agent) for agent in task["agents"]])
    items = task["items"][:limit] if limit else task["items"]
    correct = {"dense": 0, "kvcomm": 0, "naive": 0}
    served = [0, 0]
    for index, item in enumerate(items):
        log(f"task: item {index + 1}/{len(items)}")
        for mode in correct:

            def llm(agent: Agent, prompt: Prompt, mode: str = mode) -> str:
                call = workers[mode].call(
                    agent.name, prompt.system, _parts(prompt), mode, SamplingParams(max_tokens=agent.max_tokens)
                )
                if mode == "kvcomm" and any(isinstance(p, Segment) for p in prompt.parts):
                    served[0] += call.reuse.mode == "kvcomm"
                    served[1] += 1
                return call.text

            output = run_locally(pipeline, item["query"], llm).history[-1][task["score_agent"]]
            correct[mode] += item["answer"].lower() in output.lower()
    return {
        **{mode: hits / len(items) for mode, hits in correct.items()},
        "items": len(items),
        "reuse_rate_calls": _ratio(served),
    }


def _parts(prompt: Prompt) -> list[PromptPart]:
    return [
        PromptPart(p.text, segment_id(p.producer, p.text), p.placeholder)
        if isinstance(p, Segment)
        else PromptPart(p.text)
        for p in prompt.parts
    ]


# -- the program -----------------------------------------------------------------------------------------
QUICK_TTFT = {
    "agents": 3,
    "system_tokens": 64,
    "query_tokens": 128,
    "output_tokens": 64,
    "requests": 4,
    "warmup_requests": 2,
    "seed": 0,
}  # the text kind stays the workload's


def load_workload(path: str | None, quick: bool) -> Json:
    file = Path(path) if path else WORKLOADS / "default.json"
    workload = json.loads(file.read_text())
    if "task_file" in workload:
        workload["task"] = json.loads((file.parent / workload["task_file"]).read_text())["task"]
    if not {"ttft", "task"} & set(workload):
        raise ValueError(f"{file}: a workload needs a 'ttft' or a 'task' section (see {WORKLOADS / 'README.md'})")
    if quick and "ttft" in workload:
        workload["ttft"] = QUICK_TTFT | {"text": workload["ttft"].get("text", "sentences")}
    return workload


def run_kvcomm_bench(args: argparse.Namespace) -> int:
    workload = load_workload(args.workload, args.quick)
    started = time.perf_counter()
    loaded = Engine.load(args.model, device=args.device)
    redis = None if args.store == "memory" else EmbeddedRedis()
    config = MatchConfig()

    def store(name: str) -> MemoryStore | RedisStore:
        return MemoryStore() if redis is None else RedisStore(redis.url, prefix=f"bench-{name}")

    stores = [store("kvcomm"), store("forced")]  # kvcomm's (shared with naive and the task), forced's
    workers = {}
    for mode in TTFT_MODES:
        forced = mode == "forced"
        settings = WorkerConfig(match=FORCED if forced else config, warm_up=False)
        worker = build_worker(settings, stores[forced], model=loaded.model, tokenizer=loaded.tokenizer)
        workers[mode] = InProcessWorker(worker)
    results: Json = {
        "workload": workload["name"],
        "machine": machine_info(loaded.model.device),
        "match_config": config.__dict__,
        "store": "redis" if redis else "memory",
    }
    try:
        if "ttft" in workload:
            results.update(bench_ttft(workers, workload["ttft"]))
        if "task" in workload:
            results["accuracy"] = bench_task(workers, workload["task"], 4 if args.quick else None)
    finally:
        for worker in workers.values():
            worker.planner.close()
        if redis is not None:
            redis.stop()
    results["wall_s"] = time.perf_counter() - started
    _print(results)
    save_json(args.json_path, results, log)
    return 0


def _print(results: Json) -> None:
    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    if "agents" in results:
        header = ("agent", "tokens", "dense s", "prefix s", "kvcomm s", "naive s", "x dense")
        print(" ".join(f"{h:>8}" for h in header))
        for row in results["agents"]:
            print(
                f"{row['agent']:>8} {row['prompt_tokens']:>8} {fmt(row['ttft_dense_s']):>8} "
                f"{fmt(row['ttft_prefix_s']):>8} {fmt(row['ttft_kvcomm_s']):>8} {fmt(row['ttft_naive_s']):>8} "
                f"{fmt(row['speedup'], '.1f'):>8}"
            )
        keys = ("calls", "calls_warm", "tokens", "tokens_warm")
        rates = {key: fmt(results[f"reuse_rate_{key}"], ".0%") for key in keys}
        print(
            f"reuse: calls {rates['calls']} (warm {rates['calls_warm']}), "
            f"tokens {rates['tokens']} (warm {rates['tokens_warm']})"
        )
        bins = ((f"<{row['nearest_to']}", row) for row in results["calibration"])
        for mode, row in [*results["fidelity"].items(), *bins]:
            if row["calls"]:
                print(
                    f"fidelity {mode:>6}: first token {row['first_token_agreement']:.0%}, greedy-32 "
                    f"{row['greedy32_agreement']:.0%} (identical {row['greedy32_identical']:.0%}), "
                    f"KL {row['mean_kl']:.4f} over {row['calls']} calls"
                )
    if "accuracy" in results:
        acc = results["accuracy"]
        print(
            f"accuracy over {acc['items']} items: dense {acc['dense']:.0%}, kvcomm {acc['kvcomm']:.0%}, "
            f"naive {acc['naive']:.0%}; kvcomm reuse {fmt(acc['reuse_rate_calls'], '.0%')} of calls with segments"
        )
