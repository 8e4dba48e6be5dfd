"""Filling an agent's template: placeholders become segments, tools are called with what they read."""

from __future__ import annotations

from collections.abc import Mapping

from .agent import Agent
from .parts import Part, Prompt, SegmentPart, TextPart
from .template import Placeholder, Template
from .tool import Tool


def render(agent: Agent, tools: Mapping[str, Tool], values: Mapping[str, str]) -> Prompt:
    """values: placeholder key ("query", "writer", "writer.prev") -> text; tools are computed here."""
    filled = dict(values)
    for placeholder in agent.placeholders:
        if placeholder.source in tools and placeholder.key not in filled:
            filled[placeholder.key] = tools[placeholder.source](filled)
    parts: list[Part] = []
    for piece in Template(agent.template).pieces():
        if isinstance(piece, Placeholder):
            if piece.key not in filled:
                raise KeyError(f"agent {agent.name!r} has no value for {{{piece.key}}}")
            parts.append(SegmentPart(piece.key, piece.source, filled[piece.key]))
        else:
            parts.append(TextPart(piece))
    return Prompt(agent.system, tuple(parts))
