"""`kvmesh bench fidelity`: do the reuse modes keep dense's answers? Paired, on invented facts, through the
worker's real reuse path.

Items come from bench/fidelity_items.py (relay, retrieval, critique; a tune and a holdout split). Each shape
is a Pipeline of Agents (bench/fidelity_pipelines.py), rendered by the agents package and turned into the
worker's prompt parts as the runtime does (runtime/wire.py's GenerateRequest, then what the worker service
takes from it: runtime/worker_request.py). Each mode is its own in-process worker (engine, prefix cache,
reuse planner, its own anchors and segments in one real Redis) over one loaded model, so no mode sees
another's caches; calls go through the planner and the engine exactly as served calls do, minus gRPC.

Per item, the first agent call (relay's reader, critique's solver) runs once, densely, on dense's worker; its
reply and the KV its decode published are handed to every mode (the reply segment is copied into each
mode's store, as a shared Redis would have it). Every later call runs in every mode, each mode's chain
feeding on its own outputs. For each such call, the reply-start logits of the mode's prompt KV are compared
with a dense prefill of the same token ids (dense's own call when the ids are the same, else a fresh
prefill): KL and first-token agreement. Report: bench/fidelity_report.py.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvmesh.agents import Agent, Prompt, run_locally
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime.wire import generate_request
from kvmesh.runtime.worker_request import WorkerCall, worker_call
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.tokenizer import Tokenizer
from kvmesh.workers.worker import CallStats, WorkerConfig, build_worker

from .bench_common import log, machine_info
from .fidelity_frontier import plot_frontier
from .fidelity_items import SHAPES, SPLITS, Item, ItemConfig, ItemSet, contains_answer, generate_items
from .fidelity_pipelines import MAX_TOKENS, ShapePipeline, shape_pipeline
from .fidelity_report import print_report, shape_report
from .fidelity_variants import SWEEP, variant
from .inprocess_worker import CallResult, InProcessWorker
from .json_report import save_json
from .kv_fidelity import continuation, dense_logits, next_token_kl
from .paired_stats import MIN_RESAMPLES

DEFAULT_MODES = ("dense", "auto", "kvcomm", "blend")
SWEEP_SHAPES = ("relay", "retrieval")  # critique's downstream prompts are mostly exact prefix: little to learn
QUICK_ITEMS = 4


@dataclass(frozen=True)
class FidelityConfig:
    modes: tuple[str, ...] = DEFAULT_MODES  # dense first: it is the reference
    shapes: tuple[str, ...] = SHAPES
    split: str | None = None  # None: both
    limit: int | None = None  # items per shape (balanced over the splits when both run)
    seed: int = 0  # the items' and the bootstrap's
    resamples: int = MIN_RESAMPLES
    progress_every: int = 10  # items between progress lines

    def __post_init__(self) -> None:
        for name in self.modes:
            variant(name)  # a name that describes no variant is refused here, naming the forms
        if "dense" not in self.modes:
            raise ValueError(f"modes {list(self.modes)} lack dense: every mode is measured against it")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes {list(self.modes)} name a mode twice")
        object.__setattr__(self, "modes", ("dense", *(m for m in self.modes if m != "dense")))
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"shapes {list(self.shapes)}: choose one or more of {', '.join(SHAPES)}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: choose {' or '.join(SPLITS)} (or neither, for both)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 item per shape, got {self.limit}")
        if self.resamples < MIN_RESAMPLES:
            raise ValueError(f"resamples must be >= {MIN_RESAMPLES} for a stable 95% interval, got {self.resamples}")
        if self.progress_every < 1:
            raise ValueError(f"progress_every must be >= 1, got {self.progress_every}")


@dataclass
class CallRecord:
    """One agent call as the worker served it."""

    agent: str
    prompt_ids: list[int]
    reply: str
    stats: CallStats  # as a served call reports it
    wall_s: float  # planning, prefill and decode
    reuse_mode: str  # what the planner served the prompt with (stats.reuse_mode: as observed)
    kl: float = 0.0  # of dense's next-token distribution from this one, at the reply's start
    same_first_token: bool = True


@dataclass
class ModeRun:
    reply: str  # the scored agent's
    correct: bool
    calls: list[CallRecord]  # the calls this mode served (the shared first call is not one of them)


@dataclass
class ItemRun:
    item: Item
    shared: CallRecord | None  # the first call, served once, densely
    modes: dict[str, ModeRun] = field(default_factory=dict)


@dataclass
class _ModeWorker:
    worker: InProcessWorker
    store: RedisStore


def store_prefix(shape: str, mode: str) -> str:
    """Where a mode's anchors and segments live in Redis, for one shape (fresh pools per shape)."""
    return f"fidelity-{shape}-{mode}"


def select_items(items: Sequence[Item], split: str | None, limit: int | None) -> list[Item]:
    """The items of a split (or both); with a limit and both splits, the first of each split in turn."""
    if split is not None:
        return [item for item in items if item.split == split][:limit]
    if limit is None:
        return list(items)
    by_split = [[item for item in items if item.split == s] for s in SPLITS]
    taken = [item for pair in zip(*by_split, strict=False) for item in pair][:limit]
    return sorted(taken, key=lambda item: item.id)


class FidelityBench:
    def __init__(
        self,
        config: FidelityConfig,
        worker_config: WorkerConfig,
        redis_url: str,
        model: LlamaModel | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.worker_config = worker_config
        self.redis_url = redis_url
        self.model, self.tokenizer = model, tokenizer  # loaded by the first worker when not given

    def run_shape(self, shape: str, items: Sequence[Item], item_set: ItemSet) -> list[ItemRun]:
        spec = shape_pipeline(shape, item_set)
        workers = {mode: self._worker(shape, mode) for mode in self.config.modes}
        runs: list[ItemRun] = []
        started = time.perf_counter()
        try:
            for item in items:
                runs.append(self._item(spec, item, workers))
                if len(runs) % self.config.progress_every == 0 or len(runs) == len(items):
                    log(_progress(shape, runs, len(items), time.perf_counter() - started))
        finally:
            for mode_worker in workers.values():
                mode_worker.worker.planner.close()
        return runs

    def _worker(self, shape: str, mode: str) -> _ModeWorker:
        store = RedisStore(self.redis_url, prefix=store_prefix(shape, mode), origin=mode)
        settings = variant(mode).worker(self.worker_config)
        if self.model is None or self.tokenizer is None:
            built = build_worker(settings, store)
            self.model, self.tokenizer = built.engine.model, built.engine.tokenizer
        else:
            built = build_worker(settings, store, model=self.model, tokenizer=self.tokenizer)
        return _ModeWorker(InProcessWorker(built), store)

    def _item(self, spec: ShapePipeline, item: Item, workers: dict[str, _ModeWorker]) -> ItemRun:
        run = ItemRun(item, None)
        references: list[tuple[list[int], torch.Tensor]] = []  # dense's calls: prompt ids, reply-start logits
        for mode in self.config.modes:
            pipeline = spec.pipeline.with_agent_options(reuse=variant(mode).mode)
            calls: list[tuple[CallRecord, KVCache]] = []

            def llm(
                agent: Agent, prompt: Prompt, mode: str = mode, calls: list[tuple[CallRecord, KVCache]] = calls
            ) -> str:
                request = generate_request(agent, prompt, f"{item.id}/{mode}/{agent.name}", spec.pipeline.name, {})
                call = worker_call(request)
                if agent.name == spec.shared_agent:
                    if run.shared is None:
                        run.shared = self._shared_call(call, workers)
                    return run.shared.reply
                started = time.perf_counter()
                result = workers[mode].worker.call(
                    call.agent, call.system, call.parts, call.reuse, call.sampling, capture=True
                )
                if result.prompt_kv is None:
                    raise RuntimeError(
                        f"{item.id}: the {mode} worker's {agent.name} call ended before its prompt "
                        "was prefilled (the engine failed the request; see the log above)"
                    )
                calls.append((_record(call.agent, result, time.perf_counter() - started), result.prompt_kv))
                return result.text

            reply = run_locally(pipeline, item.question, llm).outputs[spec.scored_agent]
            self._measure(calls, references, is_reference=mode == "dense")
            records = [record for record, _ in calls]
            run.modes[mode] = ModeRun(reply, contains_answer(reply, item.answer), records)
        return run

    def _shared_call(self, call: WorkerCall, workers: dict[str, _ModeWorker]) -> CallRecord:
        """The first call, dense on dense's worker; the reply segment its decode published is copied into
        every other mode's store, where a downstream call looks for it."""
        dense = workers["dense"]
        started = time.perf_counter()
        result = dense.worker.call(call.agent, call.system, call.parts, "dense", call.sampling)
        record = _record(call.agent, result, time.perf_counter() - started)
        key = segment_id(call.agent, result.text)
        published = dense.store.get_segment(key)
        if published is not None:
            for mode, other in workers.items():
                if mode != "dense":
                    other.store.put_segment(key, published)
        return record

    @torch.inference_mode()
    def _measure(
        self,
        calls: list[tuple[CallRecord, KVCache]],
        references: list[tuple[list[int], torch.Tensor]],
        is_reference: bool,
    ) -> None:
        """Each call's reply-start logits from the KV its mode built, against dense prefill of the same ids:
        dense's own call where the ids match (calls come in the pipeline's order), else a fresh prefill."""
        assert self.model is not None
        for index, (record, kv) in enumerate(calls):
            logits, _ = continuation(self.model, kv, record.prompt_ids, steps=0)
            if is_reference:
                references.append((record.prompt_ids, logits))
            same = index < len(references) and references[index][0] == record.prompt_ids
            reference = references[index][1] if same else dense_logits(self.model, record.prompt_ids)
            record.kl = next_token_kl(reference, logits)
            record.same_first_token = int(reference.argmax()) == int(logits.argmax())


def _record(agent: str, result: CallResult, wall_s: float) -> CallRecord:
    return CallRecord(agent, result.prompt_ids, result.text, result.stats, wall_s, result.reuse.mode)


def _progress(shape: str, runs: list[ItemRun], total: int, elapsed: float) -> str:
    left = elapsed / len(runs) * (total - len(runs))
    scores = ", ".join(f"{mode} {sum(r.modes[mode].correct for r in runs)}" for mode in runs[0].modes)
    return f"{shape}: {len(runs)}/{total} items in {elapsed:.0f} s, ~{left:.0f} s left; correct so far: {scores}"


# -- the program -------------------------------------------------------------------------------------
def run_fidelity_bench(args: argparse.Namespace) -> int:
    limit = args.limit if args.limit is not None else (QUICK_ITEMS if args.quick else None)
    modes = args.modes or ",".join(SWEEP if args.sweep else DEFAULT_MODES)
    shapes = args.shapes or ",".join(SWEEP_SHAPES if args.sweep else SHAPES)
    config = FidelityConfig(
        modes=tuple(_names(modes)),
        shapes=tuple(_names(shapes)),
        split=args.split or ("tune" if args.sweep else None),  # thresholds are chosen on tune alone
        limit=limit,
        seed=args.seed,
        progress_every=1 if args.quick else FidelityConfig.progress_every,
    )
    worker_config = WorkerConfig(model=args.model, device=args.device, weights=args.weights)
    started = time.perf_counter()
    item_set = generate_items(ItemConfig(seed=config.seed))
    chosen = {shape: select_items(item_set.items[shape], config.split, config.limit) for shape in config.shapes}
    log(
        f"fidelity: {sum(map(len, chosen.values()))} items ({', '.join(f'{s} {len(i)}' for s, i in chosen.items())})"
        f" in modes {', '.join(config.modes)}"
    )
    tasks: dict[str, Any] = {}
    with EmbeddedRedis() as redis:
        bench = FidelityBench(config, worker_config, redis.url)
        for shape, items in chosen.items():
            shape_started = time.perf_counter()
            runs = bench.run_shape(shape, items, item_set)
            tasks[shape] = shape_report(runs, config.modes, config.resamples, config.seed)
            tasks[shape]["elapsed_s"] = time.perf_counter() - shape_started
    assert bench.model is not None
    results = {
        "model": {
            "name": args.model,
            "architecture": bench.model.config.name,
            "device": str(bench.model.device),
            "dtype": str(bench.model.dtype).removeprefix("torch."),
            "weights": bench.model.weight_format,
        },
        "machine": machine_info(bench.model.device),
        "config": {
            "modes": list(config.modes),
            "shapes": list(config.shapes),
            "split": config.split,
            "limit": config.limit,
            "seed": config.seed,
            "resamples": config.resamples,
            "max_tokens": MAX_TOKENS,
        },
        "tasks": tasks,
        "elapsed_s": time.perf_counter() - started,
    }
    print_report(results)
    save_json(args.json_path, results, log)
    plot = args.plot or (str(Path(args.json_path).with_suffix(".png")) if args.sweep and args.json_path else None)
    if plot:
        log(f"frontier plot: {plot_frontier(results, plot)}")
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]
