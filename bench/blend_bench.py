"""`kvmesh bench blend`: CacheBlend on a retrieval workload, beside dense, full reuse, a random control and
KVCOMM, in one run.

Each mode is its own in-process worker (engine + prefix cache + planner) sharing the model; the
workload's chunks are prefilled once, alone, into each worker's store before anything is timed (the
chunk precompute CacheBlend assumes). For every question and mode: TTFT (planning and the blend pass
included), and from the prompt KV the mode produced, the next-token distribution and 32 greedy tokens
against dense on the same ids; the greedy tokens are also the mode's answer, scored against the item's.
Workload schema: bench/workloads/blend/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.blend import BlendConfig
from kvmesh.workers.engine import Engine
from kvmesh.workers.reuse_planner import PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.worker import WorkerConfig, build_worker

from .bench_common import log, machine_info
from .inprocess_worker import InProcessWorker
from .json_report import save_json
from .kv_fidelity import compare, continuation, summarize

Json = dict[str, Any]
WORKLOADS = Path(__file__).parent / "workloads" / "blend"
# mode name -> (planner mode, blend config)
MODES: dict[str, tuple[str, BlendConfig | None]] = {
    "dense": ("dense", None),
    "full_reuse": ("naive", None),
    "blend_0.05": ("blend", BlendConfig(share=0.05)),
    "blend_0.15": ("blend", BlendConfig(share=0.15)),
    "blend_0.30": ("blend", BlendConfig(share=0.30)),
    "random_0.15": ("blend", BlendConfig(share=0.15, selection="random")),
    "kvcomm": ("kvcomm", None),
}


def item_parts(workload: Json, item: Json, texts: dict[str, str]) -> list[PromptPart]:
    """An item's prompt: each retrieved chunk, a segment, inside the workload's chunk template; then the question."""
    head, _, tail = workload["chunk_template"].partition("{chunk}")
    parts: list[PromptPart] = []
    for index, chunk in enumerate(item["chunks"], 1):
        text = texts[chunk]
        parts += [
            PromptPart(head.format(index=index)),
            PromptPart(text, segment_id("doc", text), "document"),
            PromptPart(tail.format(index=index)),
        ]
    return [*parts, PromptPart(item["question"])]


def run_blend_bench(args: argparse.Namespace) -> int:
    workload = json.loads(Path(args.workload or WORKLOADS / "retrieval.json").read_text())
    items = workload["items"][: 4 if args.quick else None]
    modes = (
        {"dense": MODES["dense"], "full_reuse": MODES["full_reuse"], "blend_0.15": MODES["blend_0.15"]}
        if args.quick
        else MODES
    )
    started = time.perf_counter()
    loaded = Engine.load(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = {doc["id"]: doc["text"] for doc in workload["documents"]}
    segments = [(segment_id("doc", text), text) for text in texts.values()]
    workers: dict[str, InProcessWorker] = {}
    for name, (_, config) in modes.items():
        settings = WorkerConfig(blend=config, warm_up=False)
        worker = build_worker(settings, MemoryStore(), model=model, tokenizer=tokenizer)
        log(f"{name}: prefilling {worker.planner.prefill_segments(segments)} chunks alone")
        workers[name] = InProcessWorker(worker)
    ttft: dict[str, list[float]] = {name: [] for name in modes}
    fidelity: dict[str, list[Json]] = {name: [] for name in modes if name != "dense"}
    correct = dict.fromkeys(modes, 0)
    served = dict.fromkeys(modes, 0)
    recomputed: dict[str, list[float]] = {name: [] for name in modes}
    for index, item in enumerate(items):
        log(f"item {index + 1}/{len(items)}")
        parts = item_parts(workload, item, texts)
        reference = None
        for name, (mode, _) in modes.items():
            call = workers[name].call(
                "reader", workload.get("system"), parts, mode, SamplingParams(max_tokens=1), capture=True
            )
            assert call.prompt_kv is not None
            logits, tokens = continuation(model, call.prompt_kv, call.prompt_ids)
            answer = tokenizer.decode(tokens)
            correct[name] += item["answer"].lower() in answer.lower()
            ttft[name].append(call.stats.ttft_s)
            served[name] += call.reuse.mode == mode
            span = call.reuse.reused_tokens or 1
            recomputed[name].append(call.reuse.blend_recomputed / span)
            if reference is None:
                reference = (logits, tokens)
            else:
                fidelity[name].append(compare(reference, (logits, tokens)))
    for worker in workers.values():
        worker.planner.close()
    results = _results(modes, items, ttft, fidelity, correct, served, recomputed, model.config.num_layers)
    results |= {
        "workload": workload["name"],
        "machine": machine_info(model.device),
        "wall_s": time.perf_counter() - started,
    }
    _print(results)
    save_json(args.json_path, results, log)
    return 0


def _results(
    modes: dict[str, tuple[str, BlendConfig | None]],
    items: list[Json],
    ttft: dict[str, list[float]],
    fidelity: dict[str, list[Json]],
    correct: dict[str, int],
    served: dict[str, int],
    recomputed: dict[str, list[float]],
    layers: int,
) -> Json:
    dense_ttft = statistics.median(ttft["dense"])
    out: Json = {"items": len(items), "modes": {}}
    for name, (_, config) in modes.items():
        median = statistics.median(ttft[name])
        row: Json = {
            "ttft_s": median,
            "speedup": dense_ttft / median,
            "accuracy": correct[name] / len(items),
            "served_by_mode": served[name] / len(items),
        }
        if name in fidelity:
            row |= summarize(fidelity[name])
        if config is not None:
            share = statistics.mean(recomputed[name])
            row["recomputed_share"] = share
            row["speedup_bound"] = _speedup_bound(config, layers)
        out["modes"][name] = row
    return out


def _speedup_bound(config: BlendConfig, layers: int) -> float:
    """The compute bound on the speedup: layer 0 in full, then each layer for the share its last check kept
    (all rows before the first check)."""
    checks, share, cost = config.checks(), 1.0, 1.0
    for layer in range(1, layers):
        share = checks.get(layer, share)
        cost += share
    return layers / cost


def _print(results: Json) -> None:
    header = ("mode", "TTFT s", "speedup", "bound", "first tok", "greedy32", "KL", "accuracy")
    print(" ".join(f"{h:>11}" for h in header))
    for name, row in results["modes"].items():
        cells = [
            name,
            f"{row['ttft_s']:.3f}",
            f"{row['speedup']:.2f}x",
            f"{row['speedup_bound']:.1f}x" if "speedup_bound" in row else "-",
            f"{row['first_token_agreement']:.0%}" if "first_token_agreement" in row else "-",
            f"{row['greedy32_agreement']:.0%}" if "greedy32_agreement" in row else "-",
            f"{row['mean_kl']:.4f}" if "mean_kl" in row else "-",
            f"{row['accuracy']:.0%}",
        ]
        print(" ".join(f"{c:>11}" for c in cells))
