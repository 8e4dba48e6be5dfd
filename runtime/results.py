"""What a distributed run returns: the outputs (RunResult) plus a record of every agent call and per-agent stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from kvmesh.agents import Phase, RunResult
from kvmesh.workers.worker import CallStats


@dataclass(frozen=True)
class CallRecord:
    """One agent call: who made it and in which phase, what the LLM call cost (the worker's CallStats) and the
    agent's own time around it."""

    agent: str
    phase: Phase
    stats: CallStats
    wall_s: float  # the agent's whole call: tools, routing, generation
    attempts: int = 1  # 2 when a worker died and the call was retried

    def as_json(self) -> dict[str, object]:
        """The call as `--json` writes it: one flat object, the CallStats' fields beside who made it."""
        who = {"agent": self.agent, "phase": str(self.phase), "wall_s": self.wall_s, "attempts": self.attempts}
        return who | asdict(self.stats)


@dataclass(frozen=True)
class AgentStats:
    """An agent's calls of one run, summed (tokens, wall time) or averaged (TTFT, decode rate): a view of their
    CallStats, built by `of` alone."""

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
        calls = [r.stats for r in records]
        decoded = [(c.output_tokens - 1, (c.output_tokens - 1) / c.decode_tok_s) for c in calls if c.decode_tok_s]
        decode_time = sum(t for _, t in decoded)
        return cls(
            agent=agent,
            calls=len(records),
            prompt_tokens=sum(c.prompt_tokens for c in calls),
            cached_tokens=sum(c.cached_tokens for c in calls),
            reused_tokens=sum(c.reused_tokens for c in calls),
            output_tokens=sum(c.output_tokens for c in calls),
            ttft_s=sum(c.ttft_s for c in calls) / len(calls) if calls else 0.0,
            decode_tok_s=sum(n for n, _ in decoded) / decode_time if decode_time else 0.0,
            wall_s=sum(r.wall_s for r in records),
            workers=tuple(dict.fromkeys(c.worker for c in calls)),
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
