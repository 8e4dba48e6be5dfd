"""A rendered prompt: literal text and segments (the contents of placeholders).

Segments keep their identity so a worker can reuse their KV: the id is stable for the same content from
the same producer, whichever agent's prompt it lands in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class SegmentPart:
    placeholder: str  # as written in the template, e.g. "writer.prev"
    producer: str  # "query", an agent name or a tool name
    text: str

    @property
    def segment_id(self) -> str:
        digest = hashlib.sha256(f"{self.producer}\x00{self.text}".encode()).hexdigest()[:20]
        return f"{self.producer}:{digest}"


Part = TextPart | SegmentPart


@dataclass(frozen=True)
class Prompt:
    """What an agent sends to a worker: a system message (None = the model's default) and the user message."""

    system: str | None
    parts: tuple[Part, ...]

    @property
    def user_text(self) -> str:
        return "".join(part.text for part in self.parts)
