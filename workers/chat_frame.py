"""The model's chat frame around a user message: the ids before it and after it, per system message.

The chat template is rendered once per system message around a sentinel user message and split there,
so the user message can be tokenized part by part (DESIGN §3) inside the model's own frame.
"""

from __future__ import annotations

import threading

from .tokenizer import Tokenizer

_SENTINEL = "\u2063kvmesh-user-message\u2063"
_MAX_FRAMES = 256  # system messages are few; bound the cache anyway


class ChatFramer:
    """Thread-safe; caches the frame per system message (None = the model's default)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._frames: dict[str | None, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def frame(self, system: str | None) -> tuple[list[int], list[int]]:
        """(head ids, tail ids): the chat prompt is head + user message + tail."""
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
            if len(self._frames) >= _MAX_FRAMES:
                self._frames.clear()
            self._frames[system] = frame
        return frame
