"""How close a prompt KV served by reuse is to dense prefill: the next-token distribution where the reply
starts (KL from dense, same first token) and, optionally, greedy tokens decoded from it. Shared by the
kvcomm, blend and fidelity benchmarks and blend_analysis."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.llama import LlamaModel

GREEDY_STEPS = 32


def continuation(
    model: LlamaModel, kv: KVCache, prompt_ids: list[int], steps: int = GREEDY_STEPS
) -> tuple[torch.Tensor, list[int]]:
    """The next-token logits at the prompt's end (its last token run again over a copy of the KV before
    it) and `steps` greedy tokens decoded from there."""
    cache = kv.clone()
    cache.truncate(len(prompt_ids) - 1)
    logits = model.forward(ForwardBatch.single(cache, prompt_ids[-1:]))[-1]
    tokens: list[int] = []
    step = logits
    for _ in range(steps):
        tokens.append(int(step.argmax()))
        step = model.forward(ForwardBatch.single(cache, tokens[-1:]))[-1]
    return logits, tokens


def dense_logits(model: LlamaModel, prompt_ids: list[int]) -> torch.Tensor:
    """The next-token logits at the prompt's end after a dense prefill of all of it."""
    cache = model.new_cache(capacity=len(prompt_ids))
    return model.forward(ForwardBatch.single(cache, prompt_ids))[-1]


def next_token_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of the two next-token distributions, in nats."""
    p, q = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum())


def compare(reference: tuple[torch.Tensor, list[int]], other: tuple[torch.Tensor, list[int]]) -> dict[str, Any]:
    """(logits, greedy tokens) of a mode against dense: next-token KL, same first token, common greedy prefix."""
    (ref_logits, ref_tokens), (logits, tokens) = reference, other
    common = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens, strict=True)) if a != b), len(ref_tokens))
    first = int(logits.argmax()) == int(ref_logits.argmax())
    return {"kl": next_token_kl(ref_logits, logits), "first": first, "common": common}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of `compare` over GREEDY_STEPS-token continuations, averaged."""
    if not rows:
        return {"calls": 0}
    return {
        "calls": len(rows),
        "first_token_agreement": sum(r["first"] for r in rows) / len(rows),
        "greedy32_agreement": statistics.mean(r["common"] / GREEDY_STEPS for r in rows),
        "greedy32_identical": sum(r["common"] == GREEDY_STEPS for r in rows) / len(rows),
        "mean_kl": statistics.mean(r["kl"] for r in rows),
    }
