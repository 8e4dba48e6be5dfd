"""The one definition of a segment's id: the same content from the same producer has the same id."""

from __future__ import annotations

import hashlib


def segment_id(producer: str, text: str) -> str:
    digest = hashlib.sha256(f"{producer}\x00{text}".encode()).hexdigest()[:20]
    return f"{producer}:{digest}"
