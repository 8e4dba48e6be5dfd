"""KVCOMM for one prompt: assemble its segments' KV from base KVs and anchors, or record new anchors.

A prompt is laid out as spans: an exact prefix (template text before the first segment, served by the
prefix cache), then segments and the template text between them, then a suffix that is prefilled
normally (it holds the last token, whose logits start the reply). For every segment the slot's anchor
pool must vouch for it; the text right after a segment takes the anchors' real KV of that same text.
If any segment is not vouched for, the whole call is dense and its real KV becomes new anchors.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

from .anchor import Anchor
from .anchor_match import Match, MatchConfig, blended_next_text, correct, match, signature_of
from .kv_cache import KVCache
from .rope import RopeSpec
from .store import Store


@dataclass(frozen=True)
class TokenSpan:
    """Where a prompt part's tokens sit in the tokenized prompt: positions, where a PromptPart holds text."""

    start: int  # token positions in the prompt, [start, end)
    end: int
    segment_id: str | None = None  # None: template text
    slot: str | None = None  # a segment's anchor pool: agent template x placeholder

    @property
    def is_segment(self) -> bool:
        return self.segment_id is not None


@dataclass(frozen=True)
class PromptLayout:
    spans: tuple[TokenSpan, ...]  # in order, back to back from position 0

    def segments(self) -> list[TokenSpan]:
        return [s for s in self.spans if s.is_segment]

    @property
    def reuse_start(self) -> int:
        """Where the first segment starts: everything before is exact prefix."""
        return self.segments()[0].start

    @property
    def reuse_end(self) -> int:
        """Where the last segment ends: everything after is the suffix, prefilled normally."""
        return self.segments()[-1].end


@dataclass
class KvcommOutcome:
    kv: KVCache | None  # KV of positions [reuse_start, reuse_end), or None: run dense
    reasons: dict[str, str] = field(default_factory=dict)  # segment id -> why it could not be reused
    anchors_consulted: int = 0
    matches: dict[str, Match] = field(default_factory=dict)


def assemble(
    layout: PromptLayout, bases: dict[str, KVCache], store: Store, rope: RopeSpec, config: MatchConfig
) -> KvcommOutcome:
    """The corrected KV of the reusable span, or (kv None) the reasons it cannot be, per segment: any piece
    the anchors cannot vouch for makes the call dense. Does not touch anchors' usage."""
    outcome = KvcommOutcome(kv=None)
    out, windows = _placed_windows(layout, bases)
    previous: tuple[str, Match] | None = None  # the segment before a text span, when its anchors vouched
    for span, window in windows:
        if span.is_segment:
            assert span.segment_id is not None and span.slot is not None
            anchors = store.anchors(span.slot)
            outcome.anchors_consulted += len(anchors)
            found = match(signature_of(bases[span.segment_id], config), anchors, config)
            outcome.matches[span.segment_id] = found
            previous = (span.segment_id, found) if found.reusable else None
            if not found.reusable:  # matching goes on, to say why for every segment
                outcome.reasons[span.segment_id] = found.reason
                continue
            window.fill_from(bases[span.segment_id])
            correct(window, found)
        else:
            text = blended_next_text(previous[1]) if previous is not None else None
            if text is None or text.length != window.length:
                if previous is not None:  # the text's KV is the vouching segment's to give: it could not
                    outcome.reasons[previous[0]] = "its anchors hold no KV of the template text after it"
                continue
            window.fill_from(text)
        window.shift(span.start, rope)
    if not outcome.reasons:
        outcome.kv = out
    return outcome


def mark_used(store: Store, layout: PromptLayout, outcome: KvcommOutcome) -> None:
    """Count a reuse for the anchors that carried real weight (for least-used eviction)."""
    for span in layout.segments():
        found = outcome.matches.get(span.segment_id or "")
        if found is None or found.anchor_weights is None or span.slot is None:
            continue
        order = torch.argsort(found.anchor_weights, descending=True).tolist()
        mass, used = 0.0, []
        for index in order:  # the smallest set of anchors holding 90% of the weight
            used.append(found.anchors[index].anchor_id)
            mass += float(found.anchor_weights[index])
            if mass >= 0.9:
                break
        store.mark_used(span.slot, used)


def make_anchors(
    layout: PromptLayout,
    real: KVCache,
    bases: dict[str, KVCache],
    rope: RopeSpec,
    config: MatchConfig,
    segment_ids: set[str],
) -> list[tuple[str, Anchor]]:
    """After a dense prefill (`real` holds the prompt's true KV): (slot, anchor) for the given segments."""
    made: list[tuple[str, Anchor]] = []
    spans = list(layout.spans)
    for index, span in enumerate(spans):
        if not span.is_segment or span.segment_id not in segment_ids or span.slot is None:
            continue
        base = bases[span.segment_id]
        truth = real.slice(span.start, span.end)
        truth.shift(-span.start, rope)
        delta = KVCache.from_tensors(
            truth.keys[:, :, : truth.length] - base.keys[:, :, : base.length],
            truth.values[:, :, : truth.length] - base.values[:, :, : base.length],
        )
        delta.keys[0].zero_()  # layer 0 depends on the token and position only: no deviation to learn
        delta.values[0].zero_()
        following = spans[index + 1] if index + 1 < len(spans) else None
        next_text = None
        if following is not None and not following.is_segment and following.end <= layout.reuse_end:
            next_text = real.slice(following.start, following.end)
            next_text.shift(-following.start, rope)
        made.append((span.slot, Anchor(uuid.uuid4().hex, signature_of(base, config), delta, next_text, time.time())))
    return made


def naive(layout: PromptLayout, bases: dict[str, KVCache], text_bases: dict[int, KVCache], rope: RopeSpec) -> KVCache:
    """The baseline KVCOMM improves on, and what CacheBlend starts from: every piece's base KV moved into
    place, no correction at all. text_bases: each template text span's base KV, keyed by its start."""
    out, windows = _placed_windows(layout, bases)
    for span, window in windows:
        window.fill_from(bases[span.segment_id] if span.segment_id else text_bases[span.start])
        window.shift(span.start, rope)
    return out


def _placed_windows(layout: PromptLayout, bases: dict[str, KVCache]) -> tuple[KVCache, list[tuple[TokenSpan, KVCache]]]:
    """A cache for the whole reused range and, per span in it, the window of that cache it goes to: each
    piece is then written, corrected and moved in its place (one copy, no concatenation)."""
    spans = [s for s in layout.spans if s.end > layout.reuse_start and s.start < layout.reuse_end]
    total = sum(s.end - s.start for s in spans)
    out = KVCache.empty_like(next(iter(bases.values())), capacity=total)
    out.length = total
    windows, offset = [], 0
    for span in spans:
        windows.append((span, out.window(offset, offset + span.end - span.start)))
        offset += span.end - span.start
    return out, windows
