"""Filling an agent's template: placeholders become segments, tools are called with what they read."""

from __future__ import annotations

from collections.abc import Mapping

from .agent import Agent
from .parts import Prompt, PromptPart, Segment, TextPart
from .template import Placeholder, Template
from .tool import Tool

CHUNK_SEPARATOR = "\n\n"  # between the segments of a tool that returned several texts


def render(agent: Agent, tools: Mapping[str, Tool], values: Mapping[str, str]) -> Prompt:
    """values: placeholder key ("query", "writer", "writer.prev") -> text; tools are computed here."""
    filled: dict[str, str | tuple[str, ...]] = dict(values)
    for placeholder in agent.placeholders:
        if placeholder.source in tools and placeholder.key not in filled:
            filled[placeholder.key] = tools[placeholder.source](filled)
    parts: list[PromptPart] = []
    for piece in Template(agent.template).pieces():
        if isinstance(piece, Placeholder):
            if piece.key not in filled:
                raise KeyError(f"agent {agent.name!r} has no value for {{{piece.key}}}")
            value = filled[piece.key]
            for index, text in enumerate((value,) if isinstance(value, str) else value):
                if index:
                    parts.append(TextPart(CHUNK_SEPARATOR))
                parts.append(Segment(piece.key, piece.source, text))
        else:
            parts.append(TextPart(piece))
    return Prompt(agent.system, tuple(parts))
