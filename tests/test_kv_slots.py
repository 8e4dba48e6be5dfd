"""Batched decode over KV slots computes exactly what per-sequence attention computes."""

from __future__ import annotations

import torch

from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.kv_slots import KVSlots, SlotKVCache


def make_slots(model, num_slots: int = 6, capacity: int = 64) -> KVSlots:
    c = model.config
    return KVSlots(
        num_layers=c.num_layers,
        num_slots=num_slots,
        num_kv_heads=c.num_kv_heads,
        capacity=capacity,
        head_dim=c.head_dim,
        dtype=model.dtype,
        device=model.device,
    )


def prefill(model, cache, ids: list[int]) -> None:
    model.forward(ForwardBatch.single(cache, ids))


def decode_batch(model, caches, tokens: list[int]) -> torch.Tensor:
    batch = ForwardBatch(
        token_ids=torch.tensor(tokens),
        positions=torch.tensor([c.length for c in caches]),
        chunks=[SequenceChunk(c, 1) for c in caches],
        logit_rows=torch.arange(len(caches)),
    )
    return model.forward(batch)


def test_slot_batched_decode_matches_private_caches(tiny_model):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    slots = make_slots(tiny_model)
    taken = [slots.acquire() for _ in range(6)]
    for index in (1, 4):  # leave holes so the batched span has idle slots inside it
        taken[index].free_slot()
    slot_caches = [taken[i] for i in (0, 2, 3, 5)]
    private = [tiny_model.new_cache() for _ in prompts]
    for prompt, a, b in zip(prompts, slot_caches, private, strict=True):
        prefill(tiny_model, a, prompt)
        prefill(tiny_model, b, prompt)
    for step in range(3):
        tokens = [7 + step + i for i in range(len(prompts))]
        batched = decode_batch(tiny_model, slot_caches, tokens)
        reference = decode_batch(tiny_model, private, tokens)
        torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    for a, b in zip(slot_caches, private, strict=True):
        torch.testing.assert_close(a.keys[:, :, : a.length], b.keys[:, :, : b.length], atol=1e-6, rtol=0)


def test_a_sequence_that_outgrows_its_slot_moves_out_and_stays_exact(tiny_model):
    slots = make_slots(tiny_model, num_slots=2, capacity=8)
    small, big = slots.acquire(), slots.acquire()
    private = [tiny_model.new_cache(), tiny_model.new_cache()]
    prefill(tiny_model, small, [5, 6, 7])
    prefill(tiny_model, big, list(range(10, 17)))  # 7 of 8 slot positions
    prefill(tiny_model, private[0], [5, 6, 7])
    prefill(tiny_model, private[1], list(range(10, 17)))
    for step in range(3):  # the second step pushes `big` past its slot
        tokens = [40 + step, 50 + step]
        batched = decode_batch(tiny_model, [small, big], tokens)
        torch.testing.assert_close(batched, decode_batch(tiny_model, private, tokens), atol=1e-5, rtol=0)
    assert isinstance(big, SlotKVCache) and big.slots is None and big.length == 10
    assert slots.acquire() is not None  # its slot was given back
