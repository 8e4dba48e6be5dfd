"""The forward's invariants: chunking, batching, masks, positions and RoPE moves change nothing they shouldn't.

The real SmolLM2 model where numerics at depth matter (30 layers, GQA 9:3), the tiny random model for masks
and trees. Every reference is the dense, unbatched, causal forward of the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.llama import LlamaModel

TOL = 1e-4
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "notebook in which she recorded the weather, the ships that passed, and the birds that rested on the "
    "railing. Over forty years the notebooks filled a whole shelf, and historians later used them to trace "
    "how the coastline and its storms had changed."
)


def _dense(model: LlamaModel, ids: list[int], positions: torch.Tensor | None = None):
    cache = model.new_cache()
    logits = model.forward(ForwardBatch.single(cache, ids, positions=positions, all_logits=True))
    return logits, cache


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _kv_diff(a: KVCache, b: KVCache) -> tuple[float, float]:
    assert a.length == b.length
    n = a.length
    return _max_diff(a.keys[:, :, :n], b.keys[:, :, :n]), _max_diff(a.values[:, :, :n], b.values[:, :, :n])


@pytest.fixture(scope="module")
def passage_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(PASSAGE)
    assert len(ids) >= 64
    return ids


def _tiny_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- chunked prefill ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_chunked_prefill_equals_prefill_at_once_real(model, passage_ids):
    ids = passage_ids[:61]
    full_logits, full_cache = _dense(model, ids)
    cache, pieces = model.new_cache(capacity=8), []  # small capacity: the chunks also exercise growth
    for start, end in ((0, 17), (17, 40), (40, 61)):
        pieces.append(model.forward(ForwardBatch.single(cache, ids[start:end], all_logits=True)))
    assert cache.length == 61
    assert _max_diff(torch.cat(pieces), full_logits) <= TOL
    key_diff, value_diff = _kv_diff(cache, full_cache)
    assert key_diff <= TOL and value_diff <= TOL


@pytest.mark.parametrize("splits", [(1, 2, 3), (5, 6, 30), (29, 30, 31)])
def test_chunked_prefill_equals_prefill_at_once_tiny(tiny_model, splits):
    ids = _tiny_ids(40)
    full_logits, full_cache = _dense(tiny_model, ids)
    cache, pieces, start = tiny_model.new_cache(capacity=1), [], 0
    for end in (*splits, len(ids)):
        pieces.append(tiny_model.forward(ForwardBatch.single(cache, ids[start:end], all_logits=True)))
        start = end
    assert _max_diff(torch.cat(pieces), full_logits) <= TOL
    assert max(_kv_diff(cache, full_cache)) <= TOL


# -- decode --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_decode_after_prefill_matches_dense_logits(model, tokenizer):
    ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Name three primary colors."}]))
    ids += tokenizer.encode("Red, yellow and blue.")
    dense, dense_cache = _dense(model, ids)
    prefill = len(ids) - 6
    cache = model.new_cache()
    last = model.forward(ForwardBatch.single(cache, ids[:prefill]))  # positions default to the cache's slots
    assert _max_diff(last[0], dense[prefill - 1]) <= TOL
    for i in range(prefill, len(ids)):
        step = model.forward(ForwardBatch.single(cache, [ids[i]]))
        assert cache.length == i + 1
        assert _max_diff(step[0], dense[i]) <= TOL, f"decode step at position {i}"
    assert max(_kv_diff(cache, dense_cache)) <= TOL


# -- batching -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_of_three_prompts_equals_each_alone(model, tokenizer):
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 plus 7?"]
    prompts = [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}])) for q in questions]
    assert len({len(p) for p in prompts}) > 1
    alone = [_dense(model, ids) for ids in prompts]

    caches = [model.new_cache() for _ in prompts]
    batch = ForwardBatch(
        token_ids=torch.tensor([t for ids in prompts for t in ids]),
        positions=torch.cat([torch.arange(len(ids)) for ids in prompts]),
        chunks=[SequenceChunk(cache, len(ids)) for cache, ids in zip(caches, prompts, strict=True)],
        logit_rows=torch.arange(sum(map(len, prompts))),
    )
    logits = model.forward(batch).split([len(p) for p in prompts])
    for (want_logits, want_cache), got_logits, cache in zip(alone, logits, caches, strict=True):
        assert _max_diff(got_logits, want_logits) <= TOL
        assert max(_kv_diff(cache, want_cache)) <= TOL


def test_mixed_batch_prefill_decode_and_continuation(tiny_model):
    """One batch: a fresh prefill, a 1-token decode and a 5-token continuation of a cached prefix."""
    fresh, decode, cont = _tiny_ids(12, 1), _tiny_ids(20, 2), _tiny_ids(25, 3)
    want = {name: _dense(tiny_model, ids) for name, ids in (("fresh", fresh), ("decode", decode), ("cont", cont))}
    decode_cache, cont_cache = _dense(tiny_model, decode[:-1])[1], _dense(tiny_model, cont[:-5])[1]
    fresh_cache = tiny_model.new_cache()
    batch = ForwardBatch(
        token_ids=torch.tensor(fresh + decode[-1:] + cont[-5:]),
        positions=torch.cat([torch.arange(12), torch.tensor([19]), torch.arange(20, 25)]),
        chunks=[SequenceChunk(fresh_cache, 12), SequenceChunk(decode_cache, 1), SequenceChunk(cont_cache, 5)],
        logit_rows=torch.tensor([11, 12, 13, 17]),  # a subset of rows, in batch order
    )
    logits = tiny_model.forward(batch)
    assert logits.shape == (4, 256)
    assert _max_diff(logits[0], want["fresh"][0][11]) <= TOL
    assert _max_diff(logits[1], want["decode"][0][19]) <= TOL
    assert _max_diff(logits[2], want["cont"][0][20]) <= TOL
    assert _max_diff(logits[3], want["cont"][0][24]) <= TOL
    for cache, name in ((fresh_cache, "fresh"), (decode_cache, "decode"), (cont_cache, "cont")):
        assert max(_kv_diff(cache, want[name][1])) <= TOL


def test_no_logit_rows_still_fills_the_cache(tiny_model):
    ids = _tiny_ids(10)
    cache = tiny_model.new_cache()
    batch = ForwardBatch(torch.tensor(ids), torch.arange(10), [SequenceChunk(cache, 10)], logit_rows=None)
    assert tiny_model.forward(batch) is None
    assert max(_kv_diff(cache, _dense(tiny_model, ids)[1])) == 0.0


# -- masks and trees ----------------------------------------------------------------------------------
@pytest.mark.parametrize("past", [0, 7])
def test_explicit_causal_mask_equals_none(tiny_model, past):
    ids = _tiny_ids(past + 9, seed=past)
    prefix = _dense(tiny_model, ids[:past])[1] if past else tiny_model.new_cache()
    implicit, explicit = prefix.clone(), prefix.clone()
    n = len(ids) - past
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)  # token i sees slots <= past + i
    want = tiny_model.forward(ForwardBatch.single(implicit, ids[past:], all_logits=True))
    got = tiny_model.forward(ForwardBatch.single(explicit, ids[past:], attn_mask=mask, all_logits=True))
    assert _max_diff(got, want) <= 1e-5
    assert max(_kv_diff(explicit, implicit)) <= 1e-5
    # and a different mask does change the answer (the mask is really used)
    full = torch.ones(n, past + n, dtype=torch.bool)
    other = tiny_model.forward(ForwardBatch.single(prefix.clone(), ids[past:], attn_mask=full, all_logits=True))
    assert _max_diff(other, want) > 1e-2


def test_tree_mask_with_positions_then_keep_equals_chain(tiny_model):
    """A speculation tree root -> {a, b -> c} verified in one forward, then cut to the path root, b, c."""
    prompt, (root, a, b, c) = _tiny_ids(10, 5), _tiny_ids(4, 6)
    cache = _dense(tiny_model, prompt)[1]
    p = len(prompt)
    tree = [root, a, b, c]
    parents = [None, 0, 0, 2]
    mask = torch.zeros(4, p + 4, dtype=torch.bool)
    mask[:, :p] = True
    for node in range(4):
        walk: int | None = node
        while walk is not None:
            mask[node, p + walk] = True
            walk = parents[walk]
    depth = torch.tensor([0, 1, 1, 2])
    logits = tiny_model.forward(ForwardBatch.single(cache, tree, positions=p + depth, attn_mask=mask, all_logits=True))

    chain_logits, chain_cache = _dense(tiny_model, [*prompt, root, b, c])
    branch_logits, _ = _dense(tiny_model, [*prompt, root, a])
    assert _max_diff(logits[0], chain_logits[p]) <= TOL
    assert _max_diff(logits[1], branch_logits[p + 1]) <= TOL
    assert _max_diff(logits[2], chain_logits[p + 1]) <= TOL
    assert _max_diff(logits[3], chain_logits[p + 2]) <= TOL

    cache.keep(p, [p, p + 2, p + 3])
    assert cache.length == p + 3
    assert max(_kv_diff(cache, chain_cache)) <= TOL
    after = tiny_model.forward(ForwardBatch.single(cache, [7]))  # decoding continues from the kept path
    assert _max_diff(after[0], _dense(tiny_model, [*prompt, root, b, c, 7])[0][-1]) <= TOL


# -- RoPE moves ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("start", "delta"), [(0, 1), (0, 100), (0, 1000), (0, 8100), (5000, -4990)])
def test_rope_shift_equals_running_at_the_new_positions(model, passage_ids, start, delta):
    ids = passage_ids[:64]
    moved = _dense(model, ids, positions=torch.arange(start, start + 64))[1]
    _, target = _dense(model, ids, positions=torch.arange(start + delta, start + delta + 64))
    assert _max_diff(moved.keys[:, :, :64], target.keys[:, :, :64]) > 1e-2  # the move is not a no-op

    moved.shift(delta, model.config.rope)
    key_diff, value_diff = _kv_diff(moved, target)
    assert key_diff <= TOL, f"keys after a shift by {delta}: {key_diff:.3g}"
    assert value_diff <= TOL, f"values: {value_diff:.3g}"  # no rotation; only fp32 noise of separate runs
    # and the moved cache serves the next token exactly like the directly computed one
    next_pos = torch.tensor([start + delta + 64])
    got = model.forward(ForwardBatch.single(moved, [passage_ids[64]], positions=next_pos))
    want = model.forward(ForwardBatch.single(target, [passage_ids[64]], positions=next_pos))
    assert _max_diff(got, want) <= TOL


def test_rope_shift_tiny_all_layers_and_compositions(tiny_model):
    ids = _tiny_ids(64, 9)
    base = _dense(tiny_model, ids)[1]
    target = _dense(tiny_model, ids, positions=torch.arange(300, 364))[1]
    stepwise = base.clone()
    for _ in range(6):
        stepwise.shift(50, tiny_model.config.rope)
    stepwise.shift(0, tiny_model.config.rope)
    assert max(_kv_diff(stepwise, target)) <= TOL
    stepwise.shift(-300, tiny_model.config.rope)
    assert max(_kv_diff(stepwise, base)) <= TOL


# -- input validation ----------------------------------------------------------------------------------
def test_positions_outside_the_context_are_rejected(tiny_model):
    limit = tiny_model.config.max_context
    for bad in (torch.tensor([limit]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="positions"):
            tiny_model.forward(ForwardBatch.single(tiny_model.new_cache(), [5], positions=bad))


def test_forward_batch_shape_mismatch_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="must both be"):
        ForwardBatch(torch.tensor([1, 2, 3]), torch.arange(3), [SequenceChunk(tiny_model.new_cache(), 2)])
