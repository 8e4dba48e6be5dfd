"""Matching a new segment against a slot's anchors, and correcting its base KV with their deviations.

Distances are normalized (mean absolute difference over mean magnitude), so the softmax temperature
means the same thing for every model and segment length; the reference's raw sums over ~10^6 elements
saturate its softmax into a one-hot and make its entropy test vacuous.

The decision: enough anchors must cover the segment, the nearest must fit (distance bound), and the
match must be certain. Certainty is the entropy test, with one amendment: a high-entropy match is still
accepted when the candidate anchors agree on the deviation they predict (their weighted spread is
small). Without it, a pool of equally good anchors - the normal state for a homogeneous workload - would
look "uncertain" and force dense calls forever, adding ever more equally good anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .anchor import Anchor
from .kv_cache import KVCache


@dataclass(frozen=True)
class MatchConfig:
    temperature: float = 0.05  # on normalized distances (~0.1-0.5 between unrelated texts)
    entropy_gamma: float = 0.5  # certain: the anchor weights' entropy <= gamma * log2(#anchors) ...
    max_spread: float = 0.5  # ... or the anchors' predicted deviations agree within this (normalized)
    max_distance: float = 0.5  # reuse only if the nearest anchor is at most this far (normalized)
    min_anchors: int = 2  # anchors in the slot before it may vouch for anything
    max_uncovered: float = 0.1  # share of a segment's last tokens that may lie past every anchor (uncorrected)
    signature_stride: int = 6  # compare every n-th layer's KV (from layer 1): cheaper, as discriminative

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.entropy_gamma <= 1:
            raise ValueError(f"entropy_gamma must be in (0, 1], got {self.entropy_gamma}")
        if self.max_distance <= 0:
            raise ValueError(f"max_distance must be positive, got {self.max_distance}")
        if self.min_anchors < 1 or self.signature_stride < 1:
            raise ValueError("min_anchors and signature_stride must be >= 1")
        if not 0 <= self.max_uncovered < 1:
            raise ValueError(f"max_uncovered must be in [0, 1), got {self.max_uncovered}")

    def signature_layers(self, num_layers: int) -> list[int]:
        return list(range(1, num_layers, self.signature_stride))


@dataclass
class Match:
    reusable: bool
    reason: str  # why not, when not reusable; "" otherwise
    anchors: list[Anchor] = field(default_factory=list)  # the candidates (those covering the segment)
    token_weights: torch.Tensor | None = None  # [A, T] per-token softmax over anchors
    anchor_weights: torch.Tensor | None = None  # [A] softmax over whole-segment distances
    entropy_bits: float = 0.0
    nearest: float = math.inf
    spread: float = math.inf  # disagreement of the anchors' predicted deviations (normalized)


def signature_of(base: KVCache, config: MatchConfig) -> KVCache:
    """The part of a segment's base KV that matching compares: a few layers, keys (normalized) and values."""
    layers = config.signature_layers(base.num_layers)
    return KVCache.from_tensors(base.keys[layers, :, : base.length], base.values[layers, :, : base.length])


def match(signature: KVCache, anchors: Sequence[Anchor], config: MatchConfig) -> Match:
    """Decide whether the slot's anchors can vouch for a segment with this signature.

    Anchors may be shorter than the segment: each token is weighed over the anchors that reach it, and
    a short tail past every anchor (`max_uncovered`) stays uncorrected. The reference demands that every
    candidate cover the whole segment, which keeps refusing segments longer than most earlier ones: and
    every text's length differs.
    """
    tokens = signature.length
    longest = max((a.num_tokens for a in anchors), default=0)
    needed = math.ceil(tokens * (1 - config.max_uncovered))
    if len(anchors) < config.min_anchors or longest < needed:
        return Match(
            False,
            f"{len(anchors)} anchors, longest {longest} tokens: need {config.min_anchors}, one covering {needed}",
            list(anchors),
        )
    x_k, x_v = signature.keys[:, :, :tokens], signature.values[:, :, :tokens]  # [S, H, T, D]
    scale = 0.5 * (x_k.abs().mean() + x_v.abs().mean())
    per_token = torch.full((len(anchors), tokens), math.inf)  # [A, T]; inf where an anchor ends early
    for row, anchor in enumerate(anchors):
        n = min(tokens, anchor.num_tokens)
        per_token[row, :n] = (
            (x_k[:, :, :n] - anchor.signature.keys[:, :, :n]).abs().mean((0, 1, 3))
            + (x_v[:, :, :n] - anchor.signature.values[:, :, :n]).abs().mean((0, 1, 3))
        ) / (2 * scale)
    covered = per_token.isfinite()
    whole = torch.where(covered, per_token, 0.0).sum(1) / covered.sum(1)  # [A] mean over the tokens it reaches
    anchor_weights = torch.softmax(-whole / config.temperature, dim=0)
    token_weights = torch.softmax(-per_token / config.temperature, dim=0)  # exp(-inf) = 0 past an anchor's end
    token_weights = torch.nan_to_num(token_weights)  # the uncovered tail: no anchor, no correction
    entropy = float(-(anchor_weights * torch.log2(anchor_weights.clamp_min(1e-30))).sum())
    result = Match(
        True,
        "",
        list(anchors),
        token_weights=token_weights,
        anchor_weights=anchor_weights,
        entropy_bits=entropy,
        nearest=float(whole.min()),
    )
    if result.nearest > config.max_distance:
        result.reusable, result.reason = False, f"nearest anchor is {result.nearest:.2f} away (> {config.max_distance})"
    elif entropy > config.entropy_gamma * math.log2(len(anchors)):
        result.spread = _spread(list(anchors), token_weights, config)
        if result.spread > config.max_spread:
            result.reusable = False
            result.reason = (
                f"uncertain match: entropy {entropy:.2f} bits over {len(anchors)} anchors whose deviations "
                f"disagree by {result.spread:.2f}"
            )
    return result


def _spread(anchors: Sequence[Anchor], token_weights: torch.Tensor, config: MatchConfig) -> float:
    """How much the correction's anchors disagree where it takes them: with the per-token weights actually
    used, mean_t sum_a w_a(t) |delta_a(t) - mean(t)| / mean |mean(t)|, on the signature layers."""
    layers = config.signature_layers(anchors[0].delta.num_layers)
    tokens = token_weights.shape[1]

    def delta(anchor: Anchor, n: int) -> torch.Tensor:  # [2S, H, n, D]
        return torch.cat([anchor.delta.keys[layers, :, :n], anchor.delta.values[layers, :, :n]])

    sample = delta(anchors[0], 0)
    mean = sample.new_zeros(sample.shape[0], sample.shape[1], tokens, sample.shape[3])  # [2S, H, T, D]
    for anchor, weights in zip(anchors, token_weights, strict=True):
        n = min(tokens, anchor.num_tokens)
        mean[:, :, :n] += weights[:n, None] * delta(anchor, n)
    spread = 0.0
    for anchor, weights in zip(anchors, token_weights, strict=True):
        n = min(tokens, anchor.num_tokens)
        spread += float((weights[:n, None] * (delta(anchor, n) - mean[:, :, :n]).abs()).sum())
    return spread / mean.numel() / float(mean.abs().mean().clamp_min(1e-12))


def correct(kv: KVCache, found: Match, min_weight: float = 1e-3) -> None:
    """In place: a segment's base KV + per-token weighted anchor deviations; layer 0 stays as it is (it
    depends on nothing before).

    Accumulates anchor by anchor (no [A, L, H, T, D] stack: that is ~0.5 GB for 8 anchors of 3K tokens),
    skipping anchors whose weight is negligible at every token.
    """
    assert found.reusable and found.token_weights is not None
    tokens = kv.length
    keys, values = kv.keys[1:, :, :tokens], kv.values[1:, :, :tokens]  # [L-1, H, T, D] views
    for anchor, weights in zip(found.anchors, found.token_weights.to(kv.dtype), strict=True):
        if float(weights.max()) < min_weight:
            continue
        n = min(tokens, anchor.num_tokens)  # its weights are 0 past its end
        w = weights[None, None, :n, None]  # [1, 1, n, 1]
        keys[:, :, :n].add_(w * anchor.delta.keys[1:, :, :n])
        values[:, :, :n].add_(w * anchor.delta.values[1:, :, :n])


def blended_next_text(found: Match) -> KVCache | None:
    """The KV of the template text after the segment, averaged over anchors by their segment's similarity."""
    assert found.anchor_weights is not None
    texts = [a.next_text for a in found.anchors]
    if any(t is None for t in texts) or len({t.length for t in texts if t is not None}) != 1:
        return None
    weights = found.anchor_weights.to(texts[0].dtype)[:, None, None, None, None]  # [A, 1, 1, 1, 1]
    keys = (weights * torch.stack([t.keys[:, :, : t.length] for t in texts if t is not None])).sum(0)
    values = (weights * torch.stack([t.values[:, :, : t.length] for t in texts if t is not None])).sum(0)
    return KVCache.from_tensors(keys, values)
