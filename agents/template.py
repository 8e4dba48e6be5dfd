"""Prompt templates: `{placeholders}` naming the query, upstream agents, their previous round, or tools.

`{query}` is the user's input; `{writer}` is agent writer's output in the current round; `{writer.prev}`
is its output from the previous round (empty in the first round); `{search}` is tool search's output.
Literal braces are written `{{` and `}}`, as in str.format.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import PipelineError

QUERY = "query"
PREV_SUFFIX = ".prev"


@dataclass(frozen=True)
class Placeholder:
    source: str  # "query", an agent name or a tool name
    previous_round: bool = False

    @property
    def key(self) -> str:
        """How the placeholder is written in the template, and how its value is looked up."""
        return self.source + PREV_SUFFIX if self.previous_round else self.source


@dataclass(frozen=True)
class Template:
    text: str

    def pieces(self) -> list[str | Placeholder]:
        """The template as literal text and placeholders, in order (adjacent literals merged): the pieces render
        fills, a placeholder becoming the Segments (parts.py) of its value."""
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise PipelineError(
                f"template {self.text[:60]!r} is malformed ({exc}); write literal braces as {{{{ and }}}}"
            ) from exc
        pieces: list[str | Placeholder] = []
        for literal, field, spec, conversion in parsed:
            if literal:
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += literal
                else:
                    pieces.append(literal)
            if field is None:
                continue
            if spec or conversion:
                raise PipelineError(f"placeholder {{{field}}} takes no format spec or conversion in {self.text[:60]!r}")
            pieces.append(_placeholder(field, self.text))
        return pieces

    def placeholders(self) -> list[Placeholder]:
        seen: dict[str, Placeholder] = {}
        for piece in self.pieces():
            if isinstance(piece, Placeholder):
                seen.setdefault(piece.key, piece)
        return list(seen.values())


def _placeholder(field: str, text: str) -> Placeholder:
    previous = field.endswith(PREV_SUFFIX)
    source = field.removesuffix(PREV_SUFFIX) if previous else field
    if not source.isidentifier():
        raise PipelineError(
            f"placeholder {{{field}}} in {text[:60]!r} is not a name: "
            "use {query}, {agent}, {agent.prev} or {tool}"
        )
    if previous and source == QUERY:
        raise PipelineError("{query.prev} is not a thing: the query is the same in every round")
    return Placeholder(source, previous)
