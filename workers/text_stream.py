"""A request's output as text: incremental detokenization plus stop strings.

Text that could be the beginning of a stop string is held back until it is known not to be one, so a
streaming client never sees part of a stop string.
"""

from __future__ import annotations

from .tokenizer import StreamDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stop = stop
        self._held = ""
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text safe to emit now, whether a stop string ended the output)."""
        self._held += self._decoder.push(token_id)
        hits = [(self._held.find(s), s) for s in self._stop if s in self._held]
        if hits:
            cut = min(hits)[0]
            piece, self._held = self._held[:cut], ""
            self.text += piece
            return piece, True
        keep = self._longest_stop_prefix_suffix()
        piece = self._held[: len(self._held) - keep]
        self._held = self._held[len(piece) :]
        self.text += piece
        return piece, False

    def flush(self) -> str:
        """The held-back tail, once the output ended for another reason (EOS, length)."""
        piece, self._held = self._held, ""
        self.text += piece
        return piece

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:size]):
                    best = size
                    break
        return best
