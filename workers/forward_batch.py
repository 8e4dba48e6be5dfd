"""What one model forward computes: new tokens of one or more sequences, flattened into one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.kvcomm.kv_cache import KVCache


@dataclass
class SequenceChunk:
    """`num_tokens` new tokens of one sequence, written after its cache's `length` slots.

    attn_mask: [num_tokens, length + num_tokens] bool, True = may attend. None means causal by slot.
    A speculation tree passes its tree mask here (and per-node positions in ForwardBatch.positions).
    prompt: the tokens are a prompt's (prefill), not generated ones: a quantized model computes their KV in
    fp32, whatever else shares the forward, as it is kept and shared (llama.py).
    """

    cache: KVCache
    num_tokens: int
    attn_mask: torch.Tensor | None = None
    prompt: bool = False


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [N] long, the chunks' tokens back to back
    positions: torch.Tensor  # [N] long, RoPE position of each token
    chunks: list[SequenceChunk]
    logit_rows: torch.Tensor | None = None  # [M] rows of N whose logits to compute; None = no logits

    def __post_init__(self) -> None:
        total = sum(chunk.num_tokens for chunk in self.chunks)
        if self.token_ids.shape != (total,) or self.positions.shape != (total,):
            raise ValueError(
                f"token_ids {tuple(self.token_ids.shape)} and positions {tuple(self.positions.shape)} "
                f"must both be [{total}] (the chunks' token count)"
            )

    @classmethod
    def single(
        cls,
        cache: KVCache,
        token_ids: list[int] | torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> ForwardBatch:
        """One sequence; logits for the last token (or all tokens). Several tokens without a mask are a
        prompt's; one token, or a tree under a mask, are generated ones (decode, a speculation verify)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        n = ids.numel()
        if positions is None:
            positions = torch.arange(cache.length, cache.length + n)
        rows = torch.arange(n) if all_logits else torch.tensor([n - 1])
        return cls(ids, positions, [SequenceChunk(cache, n, attn_mask, prompt=n > 1 and attn_mask is None)], rows)
