"""An agent: a named role whose prompt template is filled from the query, other agents and tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvmesh.workers.sampling_limits import InvalidRequestError, check_sampling
from kvmesh.workers.vocabulary import REUSE_MODES, ReuseMode

from .errors import PipelineError, check_text
from .template import QUERY, Placeholder, Template

# each_round: in every round; first: in the first round only (its output stays readable in later
# rounds); last: once, after the rounds end (e.g. a judge or summarizer).
RunsIn = Literal["each_round", "first", "last"]
RUNS_IN: tuple[str, ...] = ("each_round", "first", "last")


@dataclass(frozen=True)
class Agent:
    name: str
    template: str = "{query}"
    system: str | None = None  # None: the model's default system prompt
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reuse: ReuseMode = "auto"
    runs: RunsIn = "each_round"
    placeholders: tuple[Placeholder, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == QUERY:
            raise PipelineError(
                f"agent name {self.name!r} must be a Python identifier other than 'query' (templates write {{name}})"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        try:  # the engine's own rules, so nothing the worker or the wire would refuse gets past here
            check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed, self.stop)
        except InvalidRequestError as exc:
            raise PipelineError(f"agent {self.name!r}: {exc}") from None
        texts = {"template": self.template, "system": self.system or "", **{f"stop {s!r}": s for s in self.stop}}
        for field_name, text in texts.items():
            if not isinstance(text, str):
                raise PipelineError(f"agent {self.name!r}: {field_name} must be a str, got {type(text).__name__}")
            check_text(text, f"agent {self.name!r}: {field_name}", PipelineError)
        if self.reuse not in REUSE_MODES:
            raise PipelineError(f"agent {self.name!r}: reuse={self.reuse!r}; choose one of {', '.join(REUSE_MODES)}")
        if self.runs not in RUNS_IN:
            raise PipelineError(f"agent {self.name!r}: runs={self.runs!r}; choose one of {', '.join(RUNS_IN)}")
        object.__setattr__(self, "placeholders", tuple(Template(self.template).placeholders()))
