"""Agent-loop workloads for the speculation bench: stages (a role and a prompt template) and sessions
(an input pushed through a chain of stages). The file schema is documented in workloads/suffix/README.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvmesh.workers.engine import Completion, Engine
from kvmesh.workers.sampling import SamplingParams

SHIPPED_DIR = Path(__file__).parent / "workloads" / "suffix"


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Stage:
    role: str | None
    prompt: str  # with {input} and {previous} placeholders

    def render(self, value: str, previous: str) -> str:
        # plain replacement, not str.format: prompts may hold literal braces (JSON examples)
        return self.prompt.replace("{input}", value).replace("{previous}", previous)


@dataclass(frozen=True)
class Session:
    input: str
    chain: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    repetitive: bool
    max_tokens: int
    system: str | None
    stages: dict[str, Stage]
    warmup: tuple[Session, ...]
    sessions: tuple[Session, ...]

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WorkloadError(f"{path}: cannot read a JSON workload: {exc}") from exc
        try:
            return cls._parse(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{path}: {exc} (schema: {SHIPPED_DIR / 'README.md'})") from exc

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Workload:
        stages = {name: Stage(s.get("role"), str(s["prompt"])) for name, s in data["stages"].items()}

        def sessions(key: str) -> tuple[Session, ...]:
            found = tuple(Session(str(s["input"]), tuple(s["chain"])) for s in data.get(key, []))
            for session in found:
                unknown = [stage for stage in session.chain if stage not in stages]
                if unknown or not session.chain:
                    raise ValueError(f"a session in {key!r} has an empty chain or unknown stages {unknown}")
            return found

        workload = cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            repetitive=bool(data["repetitive"]),
            max_tokens=int(data["max_tokens"]),
            system=data.get("system"),
            stages=stages,
            warmup=sessions("warmup"),
            sessions=sessions("sessions"),
        )
        if not workload.sessions or workload.max_tokens < 1:
            raise ValueError("a workload needs at least one session and max_tokens >= 1")
        if {s.input for s in workload.warmup} & {s.input for s in workload.sessions}:
            raise ValueError("warmup and sessions share an input: warm trees would hold the answers")
        return workload

    def shortened(self, sessions: int, warmup: int, max_tokens: int) -> Workload:
        """A smaller copy for smoke tests."""
        return replace(
            self,
            sessions=self.sessions[:sessions],
            warmup=self.warmup[:warmup],
            max_tokens=min(self.max_tokens, max_tokens),
        )


def shipped_workloads() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.json"))


@dataclass
class Call:
    """One model call of a session: which stage, the prompt it got and what it produced."""

    session: int
    stage: str
    prompt_ids: list[int]
    completion: Completion


def run_call(engine: Engine, workload: Workload, session: Session, index: int, stage_name: str, previous: str) -> Call:
    """One stage of a session; `previous` is the text the session's previous stage produced."""
    stage = workload.stages[stage_name]
    prompt = engine.chat_prompt(stage.render(session.input, previous), system=workload.system)
    sampling = SamplingParams(max_tokens=workload.max_tokens)  # greedy: outputs must match plain decoding
    return Call(index, stage_name, prompt, engine.generate([prompt], sampling, role=stage.role)[0])


def run_session(engine: Engine, workload: Workload, session: Session, index: int) -> list[Call]:
    """Run a session's chain in order, each stage seeing the previous stage's output text."""
    calls: list[Call] = []
    for name in session.chain:
        calls.append(run_call(engine, workload, session, index, name, calls[-1].completion.text if calls else ""))
    return calls
