"""A prefix's KV read in place by every sequence that holds it (ARCHITECTURE.md, "KV memory").

A prefix-cache hit used to be copied into each sequence's own KV: 8 agents fanning out over one 2K-token
context held 8 copies of it, and every decode step read all 8. A shared prefix is the prefix tree's own
tensors instead (views, no copy, pinned by the sequence's match): a sequence holding one keeps only the tokens
after it in its KV slot, whose first `length` positions stay unwritten (on CPU, zero pages that cost no memory).

Attention then runs in two parts merged by their log-sum-exp (Hydragen's decomposition): the prefix, once for
the query rows of every sequence that shares it (one read of its KV for the whole group, in a GEMM with many
rows instead of one per sequence), and each sequence's own tokens. softmax over the union of two key sets is
the two partial softmaxes weighted by exp(lse_part - lse_all), so the result equals attention over the
concatenated KV up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns the logsumexp beside the output


@dataclass(frozen=True)
class SharedPrefix:
    """The KV of a sequence's first `length` tokens, as the prefix tree's nodes hold it (one piece a node)."""

    keys: tuple[torch.Tensor, ...]  # a piece per tree node on the path: [L, Hkv, t_i, D], views of the tree's
    values: tuple[torch.Tensor, ...]
    length: int = field(init=False)  # sum of t_i
    identity: tuple[tuple[int, int], ...] = field(init=False)  # equal for prefixes that are the same memory

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError("a shared prefix needs at least one piece, keys and values alike")
        object.__setattr__(self, "length", sum(piece.shape[2] for piece in self.keys))
        object.__setattr__(self, "identity", tuple((piece.data_ptr(), piece.shape[2]) for piece in self.keys))

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    def copy_to(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        """Write the prefix's tokens [start, end) into keys/values [L, Hkv, >= end - start, D] from slot 0."""
        offset = 0
        for piece_keys, piece_values in zip(self.keys, self.values, strict=True):
            lo, hi = max(start, offset), min(end, offset + piece_keys.shape[2])
            if lo < hi:
                keys[:, :, lo - start : hi - start] = piece_keys[:, :, lo - offset : hi - offset]
                values[:, :, lo - start : hi - start] = piece_values[:, :, lo - offset : hi - offset]
            offset += piece_keys.shape[2]

    def layer_contiguous(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [L, Hkv, P, D] with each layer's [Hkv, P, D] contiguous, without a copy: when the prefix
        is one tree node's whole tensors; None when it is pieces (or part of one)."""
        (keys, *more), (values, *_) = self.keys, self.values
        return (keys, values) if not more and keys.is_contiguous() and values.is_contiguous() else None

    def joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the prefix's keys and values as one [L, Hkv, P, D] tensor each."""
        first = self.keys[0]
        shape = (first.shape[0], first.shape[1], self.length, first.shape[3])
        keys = torch.empty(shape, dtype=first.dtype, device=first.device)
        values = torch.empty_like(keys)
        self.copy_to(keys, values, 0, self.length)
        return keys, values

    def attend(self, layer: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [Hkv, R, D]: R rows per KV head, each of which sees the whole prefix -> (out [Hkv, R, D],
        lse [Hkv, R])."""
        out: torch.Tensor | None = None
        lse: torch.Tensor | None = None
        for piece_keys, piece_values in zip(self.keys, self.values, strict=True):
            o, piece_lse = with_lse(query[None], piece_keys[layer][None], piece_values[layer][None])  # [1, Hkv, R, ..]
            out, lse = (o[0], piece_lse[0]) if out is None or lse is None else merge(out, lse, o[0], piece_lse[0])
        assert out is not None and lse is not None
        return out, lse


def attend_part(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its logsumexp over one part of the keys: query [B, Hkv, R, D], keys/values
    [B, Hkv, S, D], allowed [B or 1, 1, R or 1, S] bool (True = may attend; every row needs one) ->
    (out [B, Hkv, R, D], lse [B, Hkv, R])."""
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
    return with_lse(query, keys, values, bias)


def with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention that also returns its logsumexp: query [B, H, R, D], keys/values
    [B, H, S, D], bias additive, broadcast to [B, H, R, S] -> (out [B, H, R, D], lse [B, H, R] float32).
    On CPU, torch's flash kernel; elsewhere the scores are materialized (scores_with_lse)."""
    if query.device.type == "cpu":
        return _cpu_flash(query, keys, values, attn_mask=bias)
    return scores_with_lse(query, keys, values, bias)


def scores_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """with_lse by materialized scores, in float32 (for devices without a kernel that returns the lse)."""
    scores = query.float() @ keys.float().transpose(-1, -2) * query.shape[-1] ** -0.5  # [B, H, R, S]
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ values.float()).to(query.dtype), lse


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A and B from attention over each: out [..., D], lse [...] -> the same shapes."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None], lse
