"""KVCOMM on the real model: anchors learned from dense calls correct reused segment KV toward dense."""

from __future__ import annotations

import pytest
import torch

from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.kvcomm_reuse import PromptLayout, TokenSpan, assemble, make_anchors, mark_used, naive
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.segment_base import base_alone

pytestmark = pytest.mark.slow

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
]


class Prompt:
    """system + 'Question: {query}' + '\\nAnother agent answered:\\n{a}' + footer, tokenized part by part."""

    def __init__(self, tokenizer, index: int) -> None:
        country, capital = CAPITALS[index]
        enc = tokenizer.encode
        self.header = enc("<|im_start|>user\n")
        query = enc(f"What is the capital of {country}? Think about the geography of {country} first.")
        answer = enc(f"I believe the capital of {country} is {capital}. It is the seat of government of {country}.")
        self.parts = [
            (enc("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\nQuestion: "), None),
            (query, f"query:{index}"),
            (enc("\nAnother agent answered:\n"), None),
            (answer, f"a:{index}"),
            (enc("\nGive your final answer in one word.<|im_end|>\n<|im_start|>assistant\n"), None),
        ]
        spans, position = [], 0
        for ids, segment in self.parts:
            slot = None if segment is None else f"judge/{segment.split(':')[0]}"
            spans.append(TokenSpan(position, position + len(ids), segment, slot))
            position += len(ids)
        self.layout = PromptLayout(tuple(spans))
        self.ids = [t for ids, _ in self.parts for t in ids]

    def bases(self, model) -> dict[str, KVCache]:
        return {seg: base_alone(model, self.header, ids) for ids, seg in self.parts if seg is not None}


def dense(model, ids):
    cache = model.new_cache()
    logits = model.forward(ForwardBatch.single(cache, ids))
    return cache, logits[-1]


def finish(model, prompt: Prompt, reused: KVCache) -> tuple[KVCache, torch.Tensor]:
    """Exact prefix + the reused span + the suffix prefilled: what the engine will do."""
    cache = model.new_cache()
    model.forward(ForwardBatch.single(cache, prompt.ids[: prompt.layout.reuse_start]))
    cache.append(reused)
    logits = model.forward(ForwardBatch.single(cache, prompt.ids[prompt.layout.reuse_end :]))
    return cache, logits[-1]


def greedy(model, cache, logits, steps: int = 8) -> list[int]:
    cache, out = cache.clone(), []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = model.forward(ForwardBatch.single(cache, [out[-1]]))[-1]
    return out


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum())


@pytest.fixture(scope="module")
def trained(model, tokenizer):
    store, config = MemoryStore(), MatchConfig()
    for index in range(6):
        prompt = Prompt(tokenizer, index)
        real, _ = dense(model, prompt.ids)
        segments = {span.segment_id for span in prompt.layout.segments()}
        anchors = make_anchors(prompt.layout, real, prompt.bases(model), model.config.rope, config, segments)
        assert len(anchors) == 2
        for slot, anchor in anchors:
            store.add_anchor(slot, anchor)
    return store, config


def test_reused_kv_tracks_dense_far_better_than_naive_reuse(model, tokenizer, trained):
    store, config = trained
    for index in (7, 8):
        prompt = Prompt(tokenizer, index)
        bases = prompt.bases(model)
        real, dense_logits = dense(model, prompt.ids)
        outcome = assemble(prompt.layout, bases, store, model.config.rope, config)
        assert outcome.kv is not None, outcome.reasons
        assert outcome.kv.length == prompt.layout.reuse_end - prompt.layout.reuse_start
        cache, reuse_logits = finish(model, prompt, outcome.kv)
        texts = {prompt.layout.spans[2].start: base_alone(model, prompt.header, prompt.parts[2][0])}
        _, naive_logits = finish(model, prompt, naive(prompt.layout, bases, texts, model.config.rope))
        assert kl(dense_logits, reuse_logits) < kl(dense_logits, naive_logits) / 10
        assert greedy(model, cache, reuse_logits) == greedy(model, real, dense_logits)
        # layer 0 is exact after the move: it depends on token and position only
        torch.testing.assert_close(
            cache.keys[0, :, : prompt.layout.reuse_end], real.keys[0, :, : prompt.layout.reuse_end], atol=1e-4, rtol=0
        )


def test_without_anchors_or_fitting_ones_the_call_is_dense_and_says_why(model, tokenizer, trained):
    prompt = Prompt(tokenizer, 9)
    outcome = assemble(prompt.layout, prompt.bases(model), MemoryStore(), model.config.rope, MatchConfig())
    assert outcome.kv is None and "0 anchors, longest 0 tokens" in outcome.reasons["query:9"]
    store, _ = trained
    unlike = prompt.bases(model)
    code = tokenizer.encode("x = [y ** 2 for y in z]")  # shorter than the anchors' 15 tokens: coverage is fine
    unlike["query:9"] = base_alone(model, prompt.header, code)
    strict = MatchConfig(max_distance=0.2)
    outcome = assemble(prompt.layout, unlike, store, model.config.rope, strict)
    assert outcome.kv is None and "nearest anchor" in outcome.reasons["query:9"]


def test_reuse_counts_the_anchors_that_carried_the_weight(model, tokenizer, trained):
    store, config = trained
    prompt = Prompt(tokenizer, 7)
    before = sum(store.uses("judge/query").values())
    outcome = assemble(prompt.layout, prompt.bases(model), store, model.config.rope, config)
    mark_used(store, prompt.layout, outcome)
    assert sum(store.uses("judge/query").values()) > before
