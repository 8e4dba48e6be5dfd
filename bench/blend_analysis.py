"""Why CacheBlend loses retrieval answers on this model: two analyses of the retrieval workload, not benchmarks.

`deviation`: does layer 1's selection pick the rows that deviate at deep layers? The span's KV placed
naively (bases moved into place) against the dense prefill's, per layer and token: the rows layer 1's value
deviation selects (top 15%) against each layer's own top 15%: their overlap, and the share of that layer's
deviation they hold.

`selection`: which rows, recomputed, bring the answers back? The blend pass with the rows chosen by other
rules, beside dense: layer 1's deviation (CacheBlend), an oracle (each row's true deviation from dense, as
a share of its layer's, summed over layers 1..L-1), the question's attention (how much the question's
queries read each row when it is prefilled over the naive KV), and whole chunks (the one holding the
answer; all the others).

    .venv/bin/python -m kvmesh.bench.blend_analysis deviation [ITEMS]
    .venv/bin/python -m kvmesh.bench.blend_analysis selection [ITEMS] [RULE ...]
    (both take --model DIR and --device cuda for a bigger Llama-family model)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.blend import BlendConfig, RowChooser, blend
from kvmesh.workers.engine import Engine
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.reuse_planner import ReusePlanner
from kvmesh.workers.span_reads import span_reads
from kvmesh.workers.tokenizer import Tokenizer

from .blend_bench import WORKLOADS, item_parts
from .kv_fidelity import continuation, next_token_kl

SHARE = 0.15
RULES = ("deviation_15", "oracle_15", "question_15", "question_30", "answer_chunk", "other_chunks")


@dataclass
class Item:
    """One question's prompt: its ids, where the reused span starts, the span's naive KV, the dense KV."""

    ids: list[int]
    start: int
    placed: KVCache
    dense: KVCache
    chunks: list[tuple[int, int, str]]  # each document's span rows [a, b) and its text
    answer: str


def _items(model: LlamaModel, tokenizer: Tokenizer, count: int) -> Iterator[Item]:
    workload = json.loads((WORKLOADS / "retrieval.json").read_text())
    texts = {doc["id"]: doc["text"] for doc in workload["documents"]}
    planner = ReusePlanner(model, tokenizer, MemoryStore())
    planner.prefill_segments([(segment_id("doc", text), text) for text in texts.values()])
    try:
        for item in workload["items"][:count]:
            parts = item_parts(workload, item, texts)
            planned = planner.plan(workload.get("system"), parts, "reader", "naive")
            ids, start, placed = planned.token_ids, planned.reuse.splice_at, planned.reuse.splice_kv
            assert start is not None and placed is not None
            dense = model.new_cache(capacity=len(ids))
            model.forward(
                ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), [SequenceChunk(dense, len(ids), prompt=True)])
            )
            assert planned.layout is not None
            chunk_texts = {p.segment_id: p.text for p in parts if p.segment_id is not None}
            chunks = [
                (seg.start - start, seg.end - start, chunk_texts[seg.segment_id])
                for seg in planned.layout.segments()
                if seg.segment_id is not None
            ]
            yield Item(ids, start, placed, dense, chunks, item["answer"])
    finally:
        planner.close()


def _deviation(item: Item) -> torch.Tensor:
    """[L, M] squared key + value deviation of the naive placement from dense, per layer and span row."""
    span, start = item.placed.length, item.start
    keys = (item.dense.keys[:, :, start : start + span] - item.placed.keys[:, :, :span]).pow(2).sum(dim=(1, 3))
    values = (item.dense.values[:, :, start : start + span] - item.placed.values[:, :, :span]).pow(2).sum(dim=(1, 3))
    return keys + values


@torch.inference_mode()
def deviation(model: LlamaModel, tokenizer: Tokenizer, count: int) -> None:
    layers = model.config.num_layers
    overlap, held = torch.zeros(layers), torch.zeros(layers)
    for item in _items(model, tokenizer, count):
        span, start = item.placed.length, item.start
        values = (item.dense.values[:, :, start : start + span] - item.placed.values[:, :, :span]).pow(2)
        picked = set(torch.topk(values.sum(dim=(1, 3))[1], round(SHARE * span)).indices.tolist())  # blend's pick
        total = _deviation(item)
        for layer in range(layers):
            own = torch.topk(total[layer], round(SHARE * span)).indices
            overlap[layer] += len(picked & set(own.tolist())) / len(own) / count
            held[layer] += float(total[layer, sorted(picked)].sum() / total[layer].sum()) / count
    print(f"layer  overlap with its own top {SHARE:.0%}  share of its deviation in the layer-1 pick")
    for layer in range(layers):
        print(f"{layer:5d}  {overlap[layer]:32.2f}  {held[layer]:40.2f}")


def _true_deviation(item: Item) -> torch.Tensor:
    """[M] each row's deviation from dense as a share of its layer's, summed over layers 1..L-1."""
    per_layer = _deviation(item)[1:]  # [L - 1, M]
    return (per_layer / per_layer.sum(dim=1, keepdim=True)).sum(dim=0)


def _question_reads(model: LlamaModel, item: Item) -> torch.Tensor:
    """[M] the question's attention on each span row, with the question prefilled over the naive KV."""
    cache = item.dense.slice(0, item.start)
    cache.append(item.placed)
    return span_reads(model, cache, item.start, item.ids[item.start + item.placed.length :])


def _forced(rows: torch.Tensor) -> RowChooser:
    """A chooser keeping the given span rows at the (single) check."""

    def choose(
        layer: int, current: torch.Tensor, fresh: torch.Tensor, reused: torch.Tensor, count: int
    ) -> torch.Tensor:
        return torch.isin(current, rows.to(current.device)).nonzero()[:, 0]

    return choose


def _rule(model: LlamaModel, item: Item, rule: str) -> tuple[float, RowChooser | None]:
    """(share, chooser) for a rule; None: blend's own deviation rule."""
    span = item.placed.length
    answer = next((a, b) for a, b, text in item.chunks if item.answer in text)
    name, _, share = rule.rpartition("_")
    if rule == "answer_chunk":
        return 1.0, _forced(torch.arange(*answer))
    if rule == "other_chunks":
        return 1.0, _forced(torch.cat([torch.arange(0, answer[0]), torch.arange(answer[1], span)]))
    if name == "deviation":
        return int(share) / 100, None
    if name in ("oracle", "question"):
        scores = _true_deviation(item) if name == "oracle" else _question_reads(model, item)
        return 1.0, _forced(torch.topk(scores, round(int(share) / 100 * span)).indices)
    raise SystemExit(f"unknown rule {rule!r}: use one of {', '.join(RULES)} (any _NN share)")


@torch.inference_mode()
def selection(model: LlamaModel, tokenizer: Tokenizer, count: int, rules: list[str]) -> None:
    results: dict[str, dict[str, Any]] = {r: {"correct": 0, "kl": 0.0, "share": 0.0} for r in ["dense", *rules]}
    for index, item in enumerate(_items(model, tokenizer, count)):
        ref_logits, ref_tokens = continuation(model, item.dense, item.ids)
        marks = [f"dense={_mark(tokenizer, ref_tokens, item.answer, results['dense'])}"]
        for rule in rules:
            share, chooser = _rule(model, item, rule)
            cache, span = item.dense.slice(0, item.start), item.placed.length
            stats = blend(
                model,
                cache,
                item.ids[item.start : item.start + span],
                item.placed.clone(),
                BlendConfig(share=share),
                chooser,
            )
            rest = item.ids[item.start + span :]
            model.forward(ForwardBatch.single(cache, rest))
            logits, tokens = continuation(model, cache, item.ids)
            results[rule]["kl"] += next_token_kl(ref_logits, logits) / count
            results[rule]["share"] += stats.recomputed_tokens / span / count
            marks.append(f"{rule}={_mark(tokenizer, tokens, item.answer, results[rule])}")
        print(f"item {index + 1}/{count} ({item.answer}): {' '.join(marks)}", flush=True)
    print(f"{'rule':>14} {'recomputed':>10} {'KL':>7} {'accuracy':>8}")
    for rule, row in results.items():
        kl = f"{row['kl']:.3f}" if rule != "dense" else "-"
        print(f"{rule:>14} {row['share'] if rule != 'dense' else 1.0:10.0%} {kl:>7} {row['correct'] / count:8.0%}")


def _mark(tokenizer: Tokenizer, tokens: list[int], answer: str, row: dict[str, Any]) -> str:
    right = answer.lower() in tokenizer.decode(tokens).lower()
    row["correct"] += right
    return "Y" if right else "n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("analysis", choices=("deviation", "selection"))
    parser.add_argument("items", type=int, nargs="?", default=8)
    parser.add_argument("rules", nargs="*", default=list(RULES), help=f"selection rules (default: {' '.join(RULES)})")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), a .gguf file or an HF directory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    loaded = Engine.load(args.model, device=args.device)
    if args.analysis == "deviation":
        deviation(loaded.model, loaded.tokenizer, args.items)
    else:
        selection(loaded.model, loaded.tokenizer, args.items, args.rules)


if __name__ == "__main__":
    main()
