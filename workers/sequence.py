"""One request inside the engine: its tokens, KV cache, sampling state and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .prompt_reuse import PromptReuse
from .sampling import SamplingParams
from .text_stream import TextStream
from .vocabulary import EngineFinish


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no KV yet
    RUNNING = "running"  # admitted: prefilling in chunks, then decoding
    FINISHED = "finished"


@dataclass
class RequestStats:
    """What one engine request cost, counted as it runs: the engine's share of a call's CallStats (worker.py)."""

    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    reused_tokens: int = 0  # prompt tokens whose KV was spliced in by the reuse planner (segments)
    output_tokens: int = 0
    drafted_tokens: int = 0  # speculative draft tokens verified
    accepted_tokens: int = 0  # of those, accepted (each saved one decode step)
    verify_steps: int = 0  # steps that verified a draft
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first one (the decode phase)."""
        if self.first_token_s is None or self.finish_s is None or self.output_tokens < 2:
            return None
        elapsed = self.finish_s - self.first_token_s
        return (self.output_tokens - 1) / elapsed if elapsed > 0 else None


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    cache: KVCache
    text: TextStream
    generator: torch.Generator | None
    max_tokens: int  # sampling.max_tokens, capped so the sequence fits the model's context
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens of all_ids whose KV is in `cache`
    status: Status = Status.WAITING
    finish_reason: EngineFinish | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    prefix_match: object | None = None  # the prefix-cache match pinned while the request runs
    role: str | None = None  # the agent role, which selects a suffix tree for speculation
    reuse: PromptReuse = field(default_factory=PromptReuse)

    @property
    def num_schedulable(self) -> int:
        """Pending tokens computable now: a prefill stops at a splice point until the splice is in."""
        if self.reuse.splice_pending and self.reuse.splice_at is not None:
            return min(self.num_pending, self.reuse.splice_at - self.num_computed)
        return self.num_pending

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is still to compute (the prompt's rest, or the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)
