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
    min_anchors: int = 2  # anchors that must cover the segment's length
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
    """Decide whether the slot's anchors can vouch for a segment with this signature."""
    tokens = signature.length
    candidates = [a for a in anchors if a.num_tokens >= tokens]
    if len(candidates) < config.min_anchors:
        return Match(False, f"{len(candidates)} anchors cover {tokens} tokens (need {config.min_anchors})", candidates)
    x_k, x_v = signature.keys[:, :, :tokens], signature.values[:, :, :tokens]  # [S, H, T, D]
    scale = 0.5 * (x_k.abs().mean() + x_v.abs().mean())
    per_token = torch.stack(
        [
            (x_k - a.signature.keys[:, :, :tokens]).abs().mean((0, 1, 3))
            + (x_v - a.signature.values[:, :, :tokens]).abs().mean((0, 1, 3))
            for a in candidates
        ]
    ) / (2 * scale)  # [A, T]
    whole = per_token.mean(dim=1)  # [A]
    anchor_weights = torch.softmax(-whole / config.temperature, dim=0)
    entropy = float(-(anchor_weights * torch.log2(anchor_weights.clamp_min(1e-30))).sum())
    result = Match(
        True,
        "",
        candidates,
        token_weights=torch.softmax(-per_token / config.temperature, dim=0),
        anchor_weights=anchor_weights,
        entropy_bits=entropy,
        nearest=float(whole.min()),
    )
    if result.nearest > config.max_distance:
        result.reusable, result.reason = False, f"nearest anchor is {result.nearest:.2f} away (> {config.max_distance})"
    elif entropy > config.entropy_gamma * math.log2(len(candidates)):
        result.spread = _spread(candidates, anchor_weights, tokens, config)
        if result.spread > config.max_spread:
            result.reusable = False
            result.reason = (
                f"uncertain match: entropy {entropy:.2f} bits over {len(candidates)} anchors whose deviations "
                f"disagree by {result.spread:.2f}"
            )
    return result


def _spread(anchors: Sequence[Anchor], weights: torch.Tensor, tokens: int, config: MatchConfig) -> float:
    """How much the anchors' deviations differ, weighted: mean |delta_a - mean delta| / mean |mean delta|."""
    layers = config.signature_layers(anchors[0].delta.num_layers)
    deltas = torch.stack(
        [torch.cat([a.delta.keys[layers, :, :tokens], a.delta.values[layers, :, :tokens]]) for a in anchors]
    )  # [A, 2S, H, T, D]
    w = weights.to(deltas.dtype)[:, None, None, None, None]
    mean = (w * deltas).sum(0)
    return float((w * (deltas - mean).abs()).sum(0).mean() / mean.abs().mean().clamp_min(1e-12))


def corrected(base: KVCache, found: Match) -> KVCache:
    """base + per-token weighted anchor deviations; layer 0 stays as it is (it depends on nothing before)."""
    assert found.reusable and found.token_weights is not None
    tokens = base.length
    out = base.clone()
    weights = found.token_weights.to(base.dtype)[:, None, None, :, None]  # [A, 1, 1, T, 1]
    delta_k = torch.stack([a.delta.keys[1:, :, :tokens] for a in found.anchors])  # [A, L-1, H, T, D]
    delta_v = torch.stack([a.delta.values[1:, :, :tokens] for a in found.anchors])
    out.keys[1:, :, :tokens] += (weights * delta_k).sum(0)
    out.values[1:, :, :tokens] += (weights * delta_v).sum(0)
    return out


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
