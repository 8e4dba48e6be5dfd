"""A rendered prompt: literal text and segments (the contents of placeholders).

Segments keep their identity (producer and text) so a worker can reuse their KV wherever they land; the
runtime names them with kvcomm's segment_id, the one definition workers and runtime share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextPart:
    """Literal text of the template."""

    text: str


@dataclass(frozen=True)
class Segment:
    """A placeholder's content, with its identity: what a worker reuses KV for (worker.proto's Segment)."""

    placeholder: str  # as written in the template, e.g. "writer.prev"
    producer: str  # "query", an agent name or a tool name
    text: str


PromptPart = TextPart | Segment  # one part of a prompt, in order (worker.proto's PromptPart)


@dataclass(frozen=True)
class Prompt:
    """What an agent sends to a worker: a system message (None = the model's default) and the user message."""

    system: str | None
    parts: tuple[PromptPart, ...]

    @property
    def user_text(self) -> str:
        return "".join(part.text for part in self.parts)
