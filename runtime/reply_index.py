"""The replies a door produced, by content: so a reply that comes back is found as the segment its worker published.

A worker publishes each reply as segment_id(agent, text) with the KV of its own decode. An OpenAI client sends
that text back as an assistant message, as a whole message to another agent, or quoted inside one; only the
text comes back, so the door keeps the texts of its recent replies and who produced them, and splits a
message around the ones it contains. Bounded: `capacity` replies are kept (least recently seen go first) and
a message is searched for the newest `quote_window` of them of at least `min_quote_chars` characters — at
most quote_window substring searches per message (CPython's fast search: ~2 ms for 256 replies over 40k
characters), and at most `max_quotes` pieces are cut out of one message.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """A stretch of a message's text and who wrote it; the door makes each one a Segment of the prompt."""

    text: str
    producer: str | None  # the agent (slot) whose reply this is; None: text the client wrote


@dataclass(frozen=True)
class ReplyIndexConfig:
    capacity: int = 4096  # replies remembered for whole-message matches
    quote_window: int = 256  # the newest replies a message is searched for
    min_quote_chars: int = 32  # shorter replies ("Yes.") are only matched as whole messages
    max_quotes: int = 16  # pieces cut out of one message at most

    def __post_init__(self) -> None:
        for name in ("capacity", "quote_window", "min_quote_chars", "max_quotes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ReplyIndexConfig.{name} must be an int >= 1, got {value!r}")
        if self.quote_window > self.capacity:
            raise ValueError(f"quote_window ({self.quote_window}) must be <= capacity ({self.capacity})")


class ReplyIndex:
    """Thread-safe."""

    def __init__(self, config: ReplyIndexConfig | None = None) -> None:
        self.config = config or ReplyIndexConfig()
        self._replies: OrderedDict[str, str] = OrderedDict()  # text -> producer, newest last
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._replies)

    def add(self, producer: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._replies[text] = producer
            self._replies.move_to_end(text)
            while len(self._replies) > self.config.capacity:
                self._replies.popitem(last=False)

    def split(self, text: str) -> list[Piece]:
        """The message as pieces: known replies (with their producer) and the client's text around them."""
        with self._lock:
            producer = self._replies.get(text)
            if producer is not None:
                self._replies.move_to_end(text)
                return [Piece(text, producer)]
            candidates = [
                (reply, who)
                for reply, who in _newest(self._replies, self.config.quote_window)
                if self.config.min_quote_chars <= len(reply) < len(text)
            ]
        found: list[tuple[int, str, str]] = []  # start, reply, producer
        for reply, who in candidates:
            start = text.find(reply)
            if start >= 0:
                found.append((start, reply, who))
        if not found:
            return [Piece(text, None)]
        return _cut(text, found, self.config.max_quotes)


def _newest(replies: OrderedDict[str, str], count: int) -> list[tuple[str, str]]:
    out = []
    for item in reversed(replies.items()):
        if len(out) == count:
            break
        out.append(item)
    return out


def _cut(text: str, found: list[tuple[int, str, str]], max_quotes: int) -> list[Piece]:
    """Longest quotes first, none overlapping another; every occurrence of each (a reply quoted twice)."""
    taken: list[tuple[int, int, str]] = []  # start, end, producer
    for first, reply, who in sorted(found, key=lambda f: -len(f[1])):
        start = first
        while start >= 0 and len(taken) < max_quotes:
            end = start + len(reply)
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, who))
            start = text.find(reply, end)
    pieces: list[Piece] = []
    position = 0
    for start, end, who in sorted(taken):
        if start > position:
            pieces.append(Piece(text[position:start], None))
        pieces.append(Piece(text[start:end], who))
        position = end
    if position < len(text):
        pieces.append(Piece(text[position:], None))
    return pieces
