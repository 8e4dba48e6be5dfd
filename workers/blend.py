"""CacheBlend: reuse segments' KV at new positions and recompute only the tokens that deviate most.

The span [s, s + M) of a prompt gets its reused KV (segments' bases moved into place) appended to a
cache that already holds the exact prefix [0, s). Then, in place: layer 0 is recomputed for every token
(its KV depends on token and position only, but its outputs feed layer 1 with the real context); at
each check layer the fresh values of the tokens still selected are compared with the reused ones and
the `share` of the span with the largest deviation stays selected (the set can only narrow); at every
layer >= 1 only selected tokens are recomputed, their fresh KV replacing the reused rows. A selected
token attends to keys at positions <= its own: both reference implementations aligned the mask
bottom-right and let middle tokens see the future.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from kvmesh.kvcomm.kv_cache import KVCache

from .llama import LlamaModel
from .span_reads import span_reads

SELECTIONS = ("deviation", "random", "boundary", "question")
_BLOCK_ROWS = 64  # fewer rows per SDPA call cost more in call overhead than the skipped keys save
_MAX_BLOCKS = 4


@dataclass(frozen=True)
class BlendConfig:
    share: float = 0.15  # of the span's tokens recomputed at layers after the (last) check layer
    # check layers and the share kept at each (narrowing); default: one check at layer 1 keeping `share`
    schedule: tuple[tuple[int, float], ...] = ()
    # deviation: the rows whose values deviate most; random: the control for it; boundary: the first
    # `boundary_tokens` rows of every segment (each was computed as if it opened the prompt: they carry the
    # attention-sink role there), and `share` of the rest by deviation; question: the rows the tokens after
    # the span (the question, the template's tail) read most over the reused KV (span_reads.py)
    selection: Literal["deviation", "random", "boundary", "question"] = "deviation"
    boundary_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"blend share must be in [0, 1], got {self.share}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.boundary_tokens < 1:
            raise ValueError(f"boundary_tokens must be >= 1, got {self.boundary_tokens}")
        layers = [layer for layer, _ in self.schedule]
        shares = [share for _, share in self.schedule]
        if layers != sorted(set(layers)) or any(layer < 1 for layer in layers):
            raise ValueError(f"check layers must be increasing and >= 1, got {layers}")
        if shares != sorted(shares, reverse=True) or any(not 0 <= s <= 1 for s in shares):
            raise ValueError(f"shares must narrow (non-increasing, in [0, 1]), got {shares}")

    def checks(self) -> dict[int, float]:
        return dict(self.schedule) if self.schedule else {1: self.share}


# (check layer, span rows still selected [n], their fresh and reused values [n, Hkv, D], how many to keep)
# -> indices into those rows, any order. The built-in rules are config.selection's; analyses pass others.
RowChooser = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class BlendStats:
    """What one CacheBlend pass did; its recomputed tokens are not counted as reused in the call's CallStats."""

    span_tokens: int = 0
    selected: dict[int, int] = field(default_factory=dict)  # check layer -> tokens kept there

    @property
    def recomputed_tokens(self) -> int:
        """Tokens recomputed through the whole model (those still selected after the last check)."""
        return list(self.selected.values())[-1] if self.selected else self.span_tokens


@torch.inference_mode()
def blend(
    model: LlamaModel,
    cache: KVCache,
    token_ids: list[int],
    reused: KVCache,
    config: BlendConfig,
    choose: RowChooser | None = None,
    segments: Sequence[tuple[int, int]] = (),
    readers: Sequence[int] = (),
) -> BlendStats:
    """cache holds the exact prefix [0, s); reused: the span's KV at positions s.. . Extends cache in place.
    choose: which rows stay selected at a check (default: config.selection's rule); segments: the span's
    segments as span rows [a, b) (the boundary rule keeps the first rows of each); readers: the prompt's
    tokens after the span (the question rule keeps the rows they read most)."""
    start, span = cache.length, len(token_ids)
    if reused.length != span:
        raise ValueError(f"reused KV has {reused.length} tokens for a span of {span}")
    cache.append(reused)
    stats = BlendStats(span_tokens=span)
    checks = config.checks()
    if choose is None:
        boundary = _boundary_rows(segments, config) if config.selection == "boundary" else None
        reads = _question_reads(model, cache, start, readers) if config.selection == "question" else None
        choose = _builtin_chooser(config, boundary, reads)
    rows = torch.arange(span, device=model.device)  # span rows still selected
    h = model.embed[torch.tensor(token_ids, device=model.device)]  # [M, d]
    cos, sin = model.rotary(torch.arange(start, start + span))
    for layer in range(model.config.num_layers):
        q, k, v = model.project_qkv(layer, h, cos, sin, exact=True)  # the selected rows only; prompt KV: fp32
        if layer in checks:
            count = max(0, min(round(checks[layer] * span), len(rows)))
            keep = choose(layer, rows, v, cache.values[layer, :, start + rows].transpose(0, 1), count)
            keep = keep.sort().values.to(model.device)  # indices into the current rows
            rows, h, q, k, v, cos, sin = rows[keep], h[keep], q[keep], k[keep], v[keep], cos[keep], sin[keep]
            stats.selected[layer] = len(rows)
        if len(rows) == 0:
            break  # nothing left to recompute: the rest of the span keeps its reused KV
        slots = start + rows
        cache.keys[layer, :, slots] = k.transpose(0, 1)  # [Hkv, |S|, D]
        cache.values[layer, :, slots] = v.transpose(0, 1)
        h = model.finish_layer(layer, h, _attend_causally(q, cache.keys[layer], cache.values[layer], slots), exact=True)
    return stats


def _attend_causally(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [|S|, Hq, D] of rows at increasing cache slots; keys/values [Hkv, capacity, D] -> [|S|, Hq * D].

    Each row sees the slots <= its own. The rows go in a few blocks, each over the keys up to its last row
    only: an explicit mask makes SDPA score every key it is given, so in one call about half the scores
    are of keys the mask hides (rows spread over the span); four blocks cut that to about an eighth."""
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for block in torch.arange(q.shape[0], device=q.device).tensor_split(
        min(_MAX_BLOCKS, max(1, q.shape[0] // _BLOCK_ROWS))
    ):
        block_slots = slots[block]
        end = int(block_slots[-1]) + 1
        visible = torch.arange(end, device=q.device)[None, :] <= block_slots[:, None]  # [b, end]
        o = F.scaled_dot_product_attention(
            q[block].transpose(0, 1)[None],  # [1, Hq, b, D]
            keys[:, :end][None],
            values[:, :end][None],
            attn_mask=visible,
            enable_gqa=True,
        )  # [1, Hq, b, D]
        out[block] = o[0].transpose(0, 1).reshape(len(block), -1)
    return out


def _boundary_rows(segments: Sequence[tuple[int, int]], config: BlendConfig) -> torch.Tensor:
    """The first boundary_tokens span rows of each segment."""
    if not segments:
        raise ValueError("the boundary rule needs the span's segments")
    return torch.cat([torch.arange(start, min(end, start + config.boundary_tokens)) for start, end in segments])


def _question_reads(model: LlamaModel, cache: KVCache, start: int, readers: Sequence[int]) -> torch.Tensor:
    if not readers:
        raise ValueError("the question rule needs the tokens after the span (readers)")
    return span_reads(model, cache, start, readers)


def _builtin_chooser(config: BlendConfig, boundary: torch.Tensor | None, reads: torch.Tensor | None) -> RowChooser:
    """boundary: span rows always kept (boundary rule); reads: [M] each span row's score (question rule)."""
    generator = torch.Generator().manual_seed(config.seed)

    def choose(layer: int, rows: torch.Tensor, fresh: torch.Tensor, reused: torch.Tensor, count: int) -> torch.Tensor:
        if config.selection == "random":
            return torch.randperm(len(rows), generator=generator)[:count]
        if reads is not None:
            return torch.topk(reads[rows.to(reads.device)], count).indices
        # the largest squared deviation of the values (they carry no position, so none to undo)
        deviation = (fresh.float() - reused.float()).pow(2).sum(dim=(1, 2))  # [n]
        if boundary is None:
            return torch.topk(deviation, count).indices
        kept = torch.isin(rows, boundary.to(rows.device))
        deviation[kept] = float("inf")  # always kept, then `count` more by deviation
        return torch.topk(deviation, min(len(rows), int(kept.sum()) + count)).indices

    return choose
