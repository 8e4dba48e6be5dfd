"""What `Pipeline.stream` yields, in order of arrival; the last event is RunFinished with the result."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.agents import Phase

from .results import CallRecord, PipelineResult


@dataclass(frozen=True)
class PhaseStarted:
    phase: Phase
    agents: tuple[str, ...]


@dataclass(frozen=True)
class Token:
    """A piece of an agent's output as it decodes."""

    agent: str
    phase: Phase
    text: str


@dataclass(frozen=True)
class Retried:
    """The agent's worker died; its call starts over, so the Tokens it streamed in this phase are void."""

    agent: str
    phase: Phase
    reason: str


@dataclass(frozen=True)
class AgentFinished:
    agent: str
    phase: Phase
    text: str
    record: CallRecord


@dataclass(frozen=True)
class RunFinished:
    result: PipelineResult


StreamEvent = PhaseStarted | Token | Retried | AgentFinished | RunFinished
