"""The model's chat frame around a conversation's messages: the ids between their contents, per system message.

The chat template is rendered once per (system message, roles) around sentinel contents and split at them,
so each message's content can be tokenized part by part (ARCHITECTURE.md, "Prompts as parts") inside the
model's own frame. One user message is the common case: `frame(system)` is its head and tail.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import jinja2

from .tokenizer import Tokenizer

_MAX_FRAMES = 256  # system messages and conversation shapes are few; bound the cache anyway


def _sentinel(index: int) -> str:
    return f"\u2063kvmesh-message-{index}\u2063"


class ChatFramer:
    """Thread-safe; caches the frames per (system message (None = the model's default), roles)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._frames: dict[tuple[str | None, tuple[str, ...]], list[list[int]]] = {}
        self._lock = threading.Lock()

    def frame(self, system: str | None) -> tuple[list[int], list[int]]:
        """(head ids, tail ids): the chat prompt of one user message is head + user message + tail."""
        head, tail = self.frames(system, ("user",))
        return head, tail

    def frames(self, system: str | None, roles: Sequence[str]) -> list[list[int]]:
        """len(roles) + 1 id lists: the chat prompt is frames[0] + content 0 + frames[1] + … + frames[-1],
        with the assistant's turn opened at the end. ValueError if the template refuses these roles."""
        key = (system, tuple(roles))
        with self._lock:
            cached = self._frames.get(key)
        if cached is not None:
            return cached
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [{"role": role, "content": _sentinel(i)} for i, role in enumerate(roles)]
        try:
            text = self.tokenizer.render_chat(messages)
        except jinja2.TemplateError as exc:  # e.g. a template that insists user and assistant alternate
            raise ValueError(f"the model's chat template refuses messages of roles {list(roles)}: {exc}") from None
        pieces: list[str] = []
        for i in range(len(roles)):
            if text.count(_sentinel(i)) != 1:
                raise ValueError(f"the model's chat template does not place message {i} ({roles[i]}) exactly once")
            before, text = text.split(_sentinel(i))
            pieces.append(before)
        frames = [self.tokenizer.encode(piece) for piece in (*pieces, text)]
        with self._lock:
            if len(self._frames) >= _MAX_FRAMES:
                self._frames.clear()
            self._frames[key] = frames
        return frames
