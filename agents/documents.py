"""A small document store for retrieval pipelines: documents split into chunks, found by word overlap.

Its retriever tool returns the best chunks as a list, so each lands in the prompt as a segment of its
own: a worker prefills a chunk once, alone, and reuses that KV wherever and in whatever order the
chunk appears later (CacheBlend repairs the cross-chunk attention it misses).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from .errors import PipelineError
from .tool import Tool

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    index: int
    text: str


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class DocumentStore:
    def __init__(self, chunk_words: int = 200) -> None:
        if chunk_words < 1:
            raise PipelineError(f"chunk_words must be >= 1, got {chunk_words}")
        self.chunk_words = chunk_words
        self.chunks: list[Chunk] = []
        self._counts: list[Counter[str]] = []
        self._document_frequency: Counter[str] = Counter()

    def add(self, text: str, doc_id: str | None = None) -> list[Chunk]:
        """Split a document into chunks of about `chunk_words` words, at sentence ends where possible."""
        doc_id = doc_id or f"doc{len({c.doc_id for c in self.chunks})}"
        sentences = re.split(r"(?<=[.!?])\s+", text.strip())
        added, current = [], []
        for sentence in sentences:
            current.append(sentence)
            if sum(len(s.split()) for s in current) >= self.chunk_words:
                added.append(" ".join(current))
                current = []
        if current:
            added.append(" ".join(current))
        chunks = [Chunk(doc_id, i, body) for i, body in enumerate(added)]
        for chunk in chunks:
            counts = Counter(_words(chunk.text))
            self.chunks.append(chunk)
            self._counts.append(counts)
            self._document_frequency.update(counts.keys())
        return chunks

    def search(self, query: str, k: int = 4) -> list[Chunk]:
        """The k chunks sharing the most (rarity-weighted) words with the query, best first."""
        terms = set(_words(query))
        total = len(self.chunks)

        def score(index: int) -> float:
            counts = self._counts[index]
            return sum(
                math.log(1 + total / self._document_frequency[t]) * (1 + math.log(counts[t]))
                for t in terms
                if counts[t]
            )

        ranked = sorted(range(total), key=score, reverse=True)
        return [self.chunks[i] for i in ranked[:k]]

    def retriever(self, name: str = "documents", k: int = 4) -> Tool:
        """A tool reading {query} that fills {name} with the k best chunks, one segment each."""
        return Tool(name, lambda query: [chunk.text for chunk in self.search(query, k)])
