"""Does CacheBlend's layer-1 selection pick the rows that deviate at deep layers? An analysis, not a benchmark.

For the first items of the retrieval workload: the span's KV placed naively (bases moved into place) against
the dense prefill's, per layer and token. The rows layer 1's value deviation would select (top 15%) are
compared with each layer's own top 15%: their overlap, and the share of that layer's deviation they hold.

    .venv/bin/python -m kvmesh.bench.blend_deviation [ITEMS]
"""

from __future__ import annotations

import json
import sys

import torch

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.engine import Engine
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.reuse_planner import ReusePlanner

from .blend_bench import WORKLOADS, _pieces

SHARE = 0.15


@torch.inference_mode()
def main(items: int) -> None:
    workload = json.loads((WORKLOADS / "retrieval.json").read_text())
    loaded = Engine.load("smollm2")
    model = loaded.model
    texts = {doc["id"]: doc["text"] for doc in workload["documents"]}
    planner = ReusePlanner(model, loaded.tokenizer, MemoryStore())
    planner.prefill_segments([(segment_id("doc", text), text) for text in texts.values()])
    layers = model.config.num_layers
    overlap, held = torch.zeros(layers), torch.zeros(layers)
    for item in workload["items"][:items]:
        planned = planner.plan(workload.get("system"), _pieces(workload, item, texts), "reader", "naive")
        ids, start, placed = planned.token_ids, planned.reuse.splice_at, planned.reuse.splice_kv
        assert start is not None and placed is not None
        dense = model.new_cache(capacity=len(ids))
        model.forward(ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), [SequenceChunk(dense, len(ids))]))
        span = placed.length
        keys = (dense.keys[:, :, start : start + span] - placed.keys[:, :, :span]).pow(2).sum(dim=(1, 3))  # [L, M]
        values = (dense.values[:, :, start : start + span] - placed.values[:, :, :span]).pow(2).sum(dim=(1, 3))
        deviation = keys + values  # [L, M]
        count = round(SHARE * span)
        picked = torch.topk(values[1], count).indices  # what blend's check at layer 1 keeps
        for layer in range(layers):
            own = torch.topk(deviation[layer], count).indices
            overlap[layer] += len(set(picked.tolist()) & set(own.tolist())) / count / items
            held[layer] += float(deviation[layer, picked].sum() / deviation[layer].sum()) / items
    planner.close()
    print(f"layer  overlap with its own top {SHARE:.0%}  share of its deviation in the layer-1 pick")
    for layer in range(layers):
        print(f"{layer:5d}  {overlap[layer]:32.2f}  {held[layer]:40.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
