"""Streaming text: incremental detokenization and stop strings that span tokens."""

from __future__ import annotations

import pytest

from kvmesh.workers.text_stream import TextStream

pytestmark = pytest.mark.slow


def stream_all(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool, str]:
    stream = TextStream(tokenizer, stop)
    pieces, stopped = [], False
    for token in tokenizer.encode(text):
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    return pieces, stopped, stream.text


def test_pieces_reassemble_the_text_including_multibyte_characters(tokenizer):
    text = "Grüße aus Köln 🌍🚀 — naïve café, 東京."
    pieces, stopped, full = stream_all(tokenizer, text, ())
    assert not stopped and "".join(pieces) == full == text
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_string_across_tokens_is_cut_and_never_shown(tokenizer):
    pieces, stopped, full = stream_all(tokenizer, "The capital of France is Paris, of course.", ("is Par",))
    assert stopped and full == "The capital of France " and "".join(pieces) == full
    assert not any("is" in p and "Par" in p for p in pieces)


def test_held_back_text_is_released_when_it_was_not_a_stop(tokenizer):
    _, stopped, full = stream_all(tokenizer, "Paragraph one. Paris is nice", ("Paris!",))
    assert not stopped and full == "Paragraph one. Paris is nice"
