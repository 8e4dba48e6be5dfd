"""CacheBlend's selective recompute: share 1 is dense, share 0 is plain reuse, selected tokens never see ahead."""

from __future__ import annotations

import pytest
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.blend import BlendConfig, _attend_causally, blend
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.segment_base import base_alone
from kvmesh.workers.span_reads import span_reads

pytestmark = pytest.mark.slow

DOCS = [
    "The Nile is the longest river in Africa and flows north into the Mediterranean Sea.",
    "Mount Kilimanjaro in Tanzania is the highest mountain on the African continent.",
    "The Sahara is the largest hot desert in the world and covers much of North Africa.",
]


@pytest.fixture(scope="module")
def prompt(tokenizer):
    """prefix (exact) | three documents (the span, reused) | question (the suffix, prefilled)."""
    prefix = tokenizer.encode("<|im_start|>user\nRead the documents, then answer.\n")
    docs = [tokenizer.encode(doc + "\n") for doc in DOCS]
    suffix = tokenizer.encode("Which river is the longest in Africa?<|im_end|>\n<|im_start|>assistant\n")
    return prefix, docs, suffix


def reused_span(model, tokenizer, prefix, docs) -> KVCache:
    """Each document's KV computed alone, moved to where it sits in the prompt."""
    header = tokenizer.encode("<|im_start|>user\n")
    pieces, position = [], len(prefix)
    for doc in docs:
        base = base_alone(model, header, doc)
        base.shift(position, model.config.rope)
        pieces.append(base)
        position += len(doc)
    return KVCache.concat(pieces)


def prefilled(model, ids) -> KVCache:
    cache = model.new_cache()
    model.forward(ForwardBatch.single(cache, ids))
    return cache


def blended(model, tokenizer, prompt, config: BlendConfig, reused: KVCache | None = None, choose=None):
    prefix, docs, suffix = prompt
    cache = prefilled(model, prefix)
    span = [t for doc in docs for t in doc]
    reused = reused if reused is not None else reused_span(model, tokenizer, prefix, docs)
    stats = blend(model, cache, span, reused, config, choose)
    logits = model.forward(ForwardBatch.single(cache, suffix))[-1]
    return cache, logits, stats


@pytest.fixture(scope="module")
def int4(raw_model) -> LlamaModel:
    return LlamaModel(raw_model.config, raw_model.weights, weight_format="int4")


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_recomputing_every_token_is_dense_prefill(request, tokenizer, prompt, weights):
    """In int4 too: the recomputed rows are a prompt's, so they take fp32 as the dense prefill does."""
    model = request.getfixturevalue("model" if weights == "fp32" else "int4")
    prefix, docs, suffix = prompt
    ids = prefix + [t for doc in docs for t in doc] + suffix
    dense = model.new_cache()
    dense_logits = model.forward(ForwardBatch.single(dense, ids))[-1]
    cache, logits, stats = blended(model, tokenizer, prompt, BlendConfig(share=1.0))
    assert stats.recomputed_tokens == sum(len(d) for d in docs)
    torch.testing.assert_close(cache.keys[:, :, : len(ids)], dense.keys[:, :, : len(ids)], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.values[:, :, : len(ids)], dense.values[:, :, : len(ids)], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=0)


def test_recomputing_nothing_is_plain_reuse(model, tokenizer, prompt):
    prefix, docs, _ = prompt
    reused = reused_span(model, tokenizer, prefix, docs)
    cache, _, stats = blended(model, tokenizer, prompt, BlendConfig(share=0.0), reused)
    end = len(prefix) + reused.length
    assert stats.recomputed_tokens == 0
    # layer 0 is recomputed, but its KV depends on token and position only: equal to the reused rows
    for got, want in ((cache.keys, reused.keys), (cache.values, reused.values)):
        torch.testing.assert_close(got[:, :, len(prefix) : end], want[:, :, : reused.length], atol=1e-4, rtol=0)


def test_selected_tokens_never_attend_to_later_positions(model, tokenizer, prompt):
    prefix, docs, _ = prompt
    reused = reused_span(model, tokenizer, prefix, docs)
    config = BlendConfig(share=0.3, selection="random", seed=1)
    first, _, _ = blended(model, tokenizer, prompt, config, reused.clone())
    tail = len(docs[0]) + len(docs[1])  # garble the reused KV of the last document, at every layer
    tampered = reused.clone()
    tampered.keys[:, :, tail : reused.length] += 5.0
    tampered.values[:, :, tail : reused.length] -= 5.0
    second, _, _ = blended(model, tokenizer, prompt, config, tampered)
    before = len(prefix) + tail  # every KV row before the garbled document must be untouched by it
    torch.testing.assert_close(first.keys[:, :, :before], second.keys[:, :, :before], atol=1e-5, rtol=0)
    torch.testing.assert_close(first.values[:, :, :before], second.values[:, :, :before], atol=1e-5, rtol=0)


def test_blending_lands_closer_to_dense_than_reusing_alone(model, tokenizer, prompt):
    prefix, docs, suffix = prompt
    dense_logits = model.forward(
        ForwardBatch.single(model.new_cache(), prefix + [t for doc in docs for t in doc] + suffix)
    )[-1]

    def kl(logits: torch.Tensor) -> float:
        p, q = torch.log_softmax(dense_logits, -1), torch.log_softmax(logits, -1)
        return float((p.exp() * (p - q)).sum())

    plain = kl(blended(model, tokenizer, prompt, BlendConfig(share=0.0))[1])
    selective = kl(blended(model, tokenizer, prompt, BlendConfig(share=0.3))[1])
    assert selective < plain


def test_a_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="narrow"):
        BlendConfig(schedule=((1, 0.1), (2, 0.3)))
    with pytest.raises(ValueError, match="share must be in"):
        BlendConfig(share=1.5)


def test_blocked_attention_equals_one_masked_call():
    """Enough rows for several blocks: each block's shortened key range must not change any output."""
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 700, 64, generator=generator), torch.randn(3, 700, 64, generator=generator)
    slots = torch.randperm(600, generator=generator)[:300].sort().values + 50  # [300] rows at increasing slots
    q = torch.randn(300, 9, 64, generator=generator)
    visible = torch.arange(700)[None, :] <= slots[:, None]
    want = (
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=visible, enable_gqa=True
        )[0]
        .transpose(0, 1)
        .reshape(300, -1)
    )
    torch.testing.assert_close(_attend_causally(q, keys, values, slots), want, atol=1e-5, rtol=0)


def test_a_given_chooser_decides_which_rows_are_recomputed(model, tokenizer, prompt):
    prefix, docs, _ = prompt
    reused = reused_span(model, tokenizer, prefix, docs)
    first_doc = torch.arange(len(docs[0]))

    def first_document(layer, rows, fresh, reused_values, count):
        return torch.isin(rows, first_doc).nonzero()[:, 0]

    cache, _, stats = blended(model, tokenizer, prompt, BlendConfig(share=1.0), reused.clone(), first_document)
    assert stats.recomputed_tokens == len(docs[0])
    later = slice(len(prefix) + len(docs[0]), len(prefix) + reused.length)  # never chosen: keep the reused KV
    torch.testing.assert_close(cache.keys[1:, :, later], reused.keys[1:, :, len(docs[0]) : reused.length])
    assert not torch.allclose(cache.keys[1:, :, len(prefix) : later.start], reused.keys[1:, :, : len(docs[0])])


def test_the_boundary_rule_recomputes_the_first_tokens_of_every_segment(model, tokenizer, prompt):
    prefix, docs, _ = prompt
    reused = reused_span(model, tokenizer, prefix, docs)
    starts = [sum(len(d) for d in docs[:i]) for i in range(len(docs))]
    segments = [(start, start + len(doc)) for start, doc in zip(starts, docs, strict=True)]
    cache = prefilled(model, prefix)
    config = BlendConfig(share=0.0, selection="boundary", boundary_tokens=4)
    stats = blend(model, cache, [t for d in docs for t in d], reused.clone(), config, segments=segments)
    assert stats.recomputed_tokens == 4 * len(docs)
    for start, end in segments:  # the first 4 rows of each segment fresh, the rest as reused
        rows = slice(len(prefix) + start, len(prefix) + end)
        fresh, kept = cache.keys[5, :, rows], reused.keys[5, :, start:end]
        assert not torch.allclose(fresh[:, :4], kept[:, :4]) and torch.equal(fresh[:, 4:], kept[:, 4:])
    with_share = blend(
        model,
        prefilled(model, prefix),
        [t for d in docs for t in d],
        reused.clone(),
        BlendConfig(share=0.2, selection="boundary", boundary_tokens=4),
        segments=segments,
    )
    assert with_share.recomputed_tokens == 4 * len(docs) + round(0.2 * reused.length)  # and 20% more by deviation
    with pytest.raises(ValueError, match="segments"):
        blend(model, prefilled(model, prefix), [t for d in docs for t in d], reused.clone(), config)


def test_the_question_rule_recomputes_the_rows_the_question_reads_most(model, tokenizer, prompt):
    prefix, docs, suffix = prompt
    reused = reused_span(model, tokenizer, prefix, docs)
    span = [t for d in docs for t in d]
    over_reused = prefilled(model, prefix)
    over_reused.append(reused.clone())
    reads = span_reads(model, over_reused, len(prefix), suffix)
    assert over_reused.length == len(prefix) + len(span)  # the question's KV went to scratch slots only
    assert reads.shape == (len(span),) and (reads >= 0).all()
    # each layer 1..L-1 spreads a mass of 1 over the span
    torch.testing.assert_close(reads.sum(), torch.tensor(model.config.num_layers - 1.0), atol=1e-3, rtol=0)
    top = set(torch.topk(reads, round(0.3 * len(span))).indices.tolist())

    cache = prefilled(model, prefix)
    config = BlendConfig(share=0.3, selection="question")
    stats = blend(model, cache, span, reused.clone(), config, readers=suffix)
    assert stats.recomputed_tokens == len(top)
    changed = {
        row for row in range(len(span))
        if not torch.equal(cache.keys[5, :, len(prefix) + row], reused.keys[5, :, row])
    }  # fmt: skip
    assert changed == top  # exactly the rows the question read most were recomputed
    with pytest.raises(ValueError, match="readers"):
        blend(model, prefilled(model, prefix), span, reused.clone(), config)


def test_the_question_rule_recomputing_everything_is_dense_prefill(model, tokenizer, prompt):
    prefix, docs, suffix = prompt
    ids = prefix + [t for doc in docs for t in doc] + suffix
    dense = model.new_cache()
    dense_logits = model.forward(ForwardBatch.single(dense, ids))[-1]
    cache = prefilled(model, prefix)
    span = [t for d in docs for t in d]
    blend(model, cache, span, reused_span(model, tokenizer, prefix, docs), BlendConfig(1.0, selection="question"),
          readers=suffix)  # fmt: skip
    logits = model.forward(ForwardBatch.single(cache, suffix))[-1]  # overwrites the scratch slots
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=0)
