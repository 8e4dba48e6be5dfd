"""A prompt's token ids, assembled part by part inside the model's chat frame (DESIGN §3).

The chat template is rendered once per system message around a sentinel user message and split there
into a header and a footer. Each part (literal text or segment) is tokenized on its own, so a segment
has the same tokens wherever it lands, and its token span is known (for KV reuse of segments).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.workers.tokenizer import Tokenizer

_SENTINEL = "\u2063kvmesh-user-message\u2063"


@dataclass(frozen=True)
class PromptPiece:
    text: str
    segment_id: str | None = None  # None: literal template text


@dataclass(frozen=True)
class SegmentSpan:
    segment_id: str
    start: int  # token positions in the prompt, [start, end)
    end: int


@dataclass(frozen=True)
class PromptIds:
    ids: list[int]
    segments: list[SegmentSpan]


class ChatFramer:
    """Thread-safe; caches the header/footer ids per system message (None = the model's default)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._frames: dict[str | None, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def frame(self, system: str | None) -> tuple[list[int], list[int]]:
        with self._lock:
            cached = self._frames.get(system)
        if cached is not None:
            return cached
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": _SENTINEL}
        ]
        text = self.tokenizer.render_chat(messages)
        if text.count(_SENTINEL) != 1:
            raise ValueError("the model's chat template does not place the user message exactly once")
        head, tail = text.split(_SENTINEL)
        frame = (self.tokenizer.encode(head), self.tokenizer.encode(tail))
        with self._lock:
            if len(self._frames) > 256:  # system messages are few; bound the cache anyway
                self._frames.clear()
            self._frames[system] = frame
        return frame

    def build(self, system: str | None, pieces: Sequence[PromptPiece]) -> PromptIds:
        head, tail = self.frame(system)
        ids = list(head)
        spans: list[SegmentSpan] = []
        for piece in pieces:
            piece_ids = self.tokenizer.encode(piece.text) if piece.text else []
            if piece.segment_id is not None:
                spans.append(SegmentSpan(piece.segment_id, len(ids), len(ids) + len(piece_ids)))
            ids.extend(piece_ids)
        ids.extend(tail)
        return PromptIds(ids, spans)
