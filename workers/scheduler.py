"""Continuous batching: which tokens of which requests go into the next forward.

Every step runs the pending token of each decoding request plus, within a token budget, the next
prompt chunk of requests still prefilling. A long prompt is thus spread over several steps and never
stalls the decodes running beside it; new requests join as soon as there is room. At most `max_waiting`
requests wait for room: beyond that a request is refused (EngineOverloaded) rather than queued without end.

When room is scarce, arrival order would mix requests over different shared prefixes in one step, and each
prefix's readers then cost a step call of their own (workers/step_graph.py): an admitted request instead brings
the waiting requests that would read its prefix to the queue's front (BatchLLM's grouping), so they decode
together. Only a request admitted in its turn does so (not one brought forward), so a request passed over waits
for at most one such group.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .sequence import Sequence, Status

PARTNER_WINDOW = 64  # waiting requests compared with an admitted one for a prefix they could share


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the request was not queued; retry later or spread the load over more workers."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 16  # requests holding KV and taking part in steps
    max_batch_tokens: int = 256  # tokens per forward: one per decode, the rest for prompt chunks
    max_waiting: int = 256  # requests queued for room; more are refused, so a flood cannot grow memory unbounded

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.max_batch_tokens < self.max_running:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_running ({self.max_running}) "
                "so that every running request can decode in each step"
            )


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk reaches the last known token, so its logits yield the next token."""
        return self.num_tokens == self.seq.num_pending


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._brought_forward: set[str] = set()  # request ids moved ahead of their turn

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(
                f"the engine is overloaded: {len(self.waiting)} requests already wait "
                f"(SchedulerConfig.max_waiting={self.config.max_waiting}); retry later or add workers"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(
        self,
        admit: Callable[[Sequence], bool],
        ready: Callable[[Sequence], bool] = lambda seq: True,
        partner: Callable[[Sequence, Sequence], bool] = lambda seq, other: False,
    ) -> list[ScheduledChunk]:
        """The next step's chunks. `admit` prepares a waiting request's KV (e.g. from the prefix cache); False
        when that failed and the request has been ended. `ready` says whether a waiting request may be admitted
        now: one that may not keeps its place in the queue, and those behind it may go first. `partner(seq,
        other)` says whether waiting `other` would read the prefix admitted `seq` reads in place: such requests
        are admitted next (see the module's docstring)."""
        chunks = [ScheduledChunk(seq, seq.num_pending) for seq in self.running if not seq.in_prefill]
        budget = self.config.max_batch_tokens - sum(c.num_tokens for c in chunks)
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunks.append(ScheduledChunk(seq, min(seq.num_schedulable, budget)))
                budget -= chunks[-1].num_tokens
        held: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting.popleft()
            if not ready(seq):
                held.append(seq)
                continue
            if not admit(seq):
                continue
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, min(seq.num_schedulable, budget)))
            budget -= chunks[-1].num_tokens
            if seq.request_id in self._brought_forward:
                self._brought_forward.discard(seq.request_id)
            else:
                self._bring_forward([other for other in self._window() if partner(seq, other)])
        self.waiting.extendleft(reversed(held))
        return chunks

    def _window(self) -> list[Sequence]:
        return list(itertools.islice(self.waiting, PARTNER_WINDOW))

    def _bring_forward(self, group: list[Sequence]) -> None:
        """Move `group` (waiting requests, in queue order) to the queue's front."""
        for other in group:
            self.waiting.remove(other)
            self._brought_forward.add(other.request_id)
        self.waiting.extendleft(reversed(group))

    def remove(self, seq: Sequence) -> None:
        self._brought_forward.discard(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
