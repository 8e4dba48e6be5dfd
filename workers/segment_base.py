"""Base KVs of segments: each segment's KV computed without the context it will land in.

The user query and tool outputs are prefilled alone, behind a minimal chat header (so the model sees
them as message content, as it will in real prompts) that is then dropped; an agent's response takes its
KV from the producer's own decode, at no extra compute. Both are normalized to start at position 0.
"""

from __future__ import annotations

import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .forward_batch import ForwardBatch, SequenceChunk
from .llama import LlamaModel


def base_alone(model: LlamaModel, header_ids: list[int], token_ids: list[int]) -> KVCache:
    """Prefill header + segment, keep the segment's KV, moved to start at position 0."""
    ids = header_ids + token_ids
    cache = model.new_cache(capacity=len(ids))
    model.forward(
        ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), [SequenceChunk(cache, len(ids), prompt=True)])
    )
    kv = cache.slice(len(header_ids))
    kv.shift(-len(header_ids), model.config.rope)
    return kv


def base_from_decode(model: LlamaModel, cache: KVCache, start: int, token_ids: list[int]) -> KVCache:
    """A response's base from its producer's cache: slots [start, start + n) hold its first tokens' KV.

    The last generated token was sampled but never fed, so its KV is missing: one extra forward adds it.
    """
    have = min(cache.length - start, len(token_ids))
    kv = cache.slice(start, start + have)
    kv.shift(-start, model.config.rope)
    if have < len(token_ids):
        model.forward(ForwardBatch.single(kv, token_ids[have:]))
    return kv
