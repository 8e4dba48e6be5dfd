"""The progress of one pipeline run: which phase runs, what each agent reads, what came out.

Both the local executor and the distributed runtime drive a run through this one state machine, so
the semantics of rounds, loops and `.prev` live in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import check_text
from .pipeline import Phase, Pipeline
from .template import QUERY


@dataclass
class RunResult:
    outputs: dict[str, str]  # the pipeline's output agents -> their final text
    history: list[dict[str, str]]  # per round (then the final phase, if any): agent -> text
    rounds: int  # rounds run (the final phase not counted)


@dataclass
class RunState:
    pipeline: Pipeline
    query: str
    phase: Phase | None = field(default=Phase(0))
    history: list[dict[str, str]] = field(default_factory=lambda: [{}])
    rounds_run: int = 0

    def __post_init__(self) -> None:
        check_text(self.query, "the query")  # before anything is sent: it would fail to encode on the wire

    @property
    def finished(self) -> bool:
        return self.phase is None

    def phase_agents(self) -> list[str]:
        """Agents of the current phase, each after those it waits for."""
        return [] if self.phase is None else self.pipeline.order(self.phase)

    def external_inputs(self, name: str) -> dict[str, str]:
        """The values `name` reads that no agent of the current phase produces: query, .prev, earlier outputs."""
        assert self.phase is not None, "the run is finished"
        same_phase = set(self.pipeline.upstream(name, self.phase))
        values: dict[str, str] = {}
        for placeholder in self.pipeline.sources(self.pipeline.agents[name]):
            if placeholder.source == QUERY:
                values[QUERY] = self.query
            elif placeholder.previous_round:
                previous = self.history[self.phase.index - 1] if self.phase.index > 0 else {}
                values[placeholder.key] = previous.get(placeholder.source, "")
            elif placeholder.source not in same_phase:
                values[placeholder.key] = self.latest(placeholder.source)
        return values

    def latest(self, name: str) -> str:
        for outputs in reversed(self.history):
            if name in outputs:
                return outputs[name]
        raise KeyError(f"agent {name!r} has produced nothing yet")

    def record(self, name: str, text: str) -> None:
        assert self.phase is not None and self.phase.runs(self.pipeline.agents[name]), f"{name} does not run now"
        check_text(text, f"the output of agent {name!r}")
        self.history[-1][name] = text

    def phase_complete(self) -> bool:
        return set(self.phase_agents()) <= set(self.history[-1])

    def advance(self) -> Phase | None:
        """After a complete phase: the next round, the final phase, or None when the run is over."""
        assert self.phase is not None and self.phase_complete()
        pipeline = self.pipeline
        if not self.phase.final:
            self.rounds_run += 1
            stop = pipeline.until is not None and bool(pipeline.until(dict(self.history[-1])))
            if not stop and self.rounds_run < pipeline.rounds:
                self.phase = Phase(self.rounds_run)
                self.history.append({})
                return self.phase
            if any(agent.runs == "last" for agent in pipeline.agents.values()):
                self.phase = Phase(self.rounds_run, final=True)
                self.history.append({})
                return self.phase
        self.phase = None
        return None

    def result(self) -> RunResult:
        assert self.finished, "the run is not finished"
        return RunResult(
            outputs={name: self.latest(name) for name in self.pipeline.outputs},
            history=self.history,
            rounds=self.rounds_run,
        )
