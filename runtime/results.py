"""What a distributed run returns: the outputs (RunResult) plus a record of every agent call and per-agent stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.agents import Phase, RunResult
from kvmesh.v1 import worker_pb2

from .wire import reuse_mode_from_wire


@dataclass(frozen=True)
class CallRecord:
    """One agent call: what the worker reports (tokens, TTFT, decode rate) and the agent's wall time."""

    agent: str
    phase: Phase
    worker: str  # the worker's address
    model: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the worker's exact prefix cache
    output_tokens: int
    ttft_s: float
    decode_tok_s: float  # 0 when fewer than 2 tokens were decoded
    wall_s: float  # the agent's whole call: tools, routing, generation
    reuse_mode: str  # as observed: "kvcomm" (segments' KV reused), "prefix" (some cached tokens) or "dense"
    attempts: int  # 2 when a worker died and the call was retried
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from other agents' segments (KVCOMM, blend)
    anchors_consulted: int = 0
    segment_modes: dict[str, str] = field(default_factory=dict)  # segment id -> what served its KV
    segment_reasons: dict[str, str] = field(default_factory=dict)  # segment id -> why (what held reuse back)
    degradations: tuple[str, ...] = ()  # what went wrong and was survived (e.g. "KV store unavailable: ...")

    @classmethod
    def from_stats(cls, agent: str, phase: Phase, stats: worker_pb2.CallStats) -> CallRecord:
        return cls(
            agent=agent,
            phase=phase,
            worker=stats.worker,
            model=stats.model,
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.cached_tokens,
            output_tokens=stats.output_tokens,
            ttft_s=stats.ttft_s,
            decode_tok_s=stats.decode_tok_s,
            wall_s=stats.wall_s,
            reuse_mode=reuse_mode_from_wire(stats.reuse_mode),
            attempts=stats.attempts or 1,
            drafted_tokens=stats.drafted_tokens,
            accepted_tokens=stats.accepted_tokens,
            reused_tokens=stats.reused_tokens,
            anchors_consulted=stats.anchors_consulted,
            segment_modes={key: reuse_mode_from_wire(m) for key, m in stats.segment_modes.items()},
            segment_reasons=dict(stats.segment_reasons),
            degradations=tuple(stats.degradations),
        )


@dataclass(frozen=True)
class AgentStats:
    """An agent's calls of one run, summed (tokens, wall time) or averaged (TTFT, decode rate)."""

    agent: str
    calls: int
    prompt_tokens: int
    cached_tokens: int
    reused_tokens: int
    output_tokens: int
    ttft_s: float  # mean over its calls
    decode_tok_s: float  # decoded tokens over decode time, all calls together
    wall_s: float
    workers: tuple[str, ...]
    retries: int

    @classmethod
    def of(cls, agent: str, records: Sequence[CallRecord]) -> AgentStats:
        decoded = [(r.output_tokens - 1, (r.output_tokens - 1) / r.decode_tok_s) for r in records if r.decode_tok_s]
        decode_time = sum(t for _, t in decoded)
        return cls(
            agent=agent,
            calls=len(records),
            prompt_tokens=sum(r.prompt_tokens for r in records),
            cached_tokens=sum(r.cached_tokens for r in records),
            reused_tokens=sum(r.reused_tokens for r in records),
            output_tokens=sum(r.output_tokens for r in records),
            ttft_s=sum(r.ttft_s for r in records) / len(records) if records else 0.0,
            decode_tok_s=sum(n for n, _ in decoded) / decode_time if decode_time else 0.0,
            wall_s=sum(r.wall_s for r in records),
            workers=tuple(dict.fromkeys(r.worker for r in records)),
            retries=sum(r.attempts - 1 for r in records),
        )


@dataclass
class PipelineResult(RunResult):
    """RunResult (outputs, history, rounds) plus how the run went, call by call."""

    run_id: str = ""
    calls: list[CallRecord] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def stats(self) -> dict[str, AgentStats]:
        """Per agent, in the order agents first finished."""
        names = list(dict.fromkeys(r.agent for r in self.calls))
        return {name: AgentStats.of(name, [r for r in self.calls if r.agent == name]) for name in names}
