"""A pipeline: agents and tools whose placeholders form the graph, run in rounds.

Semantics (checked when the pipeline is built):
- Round r runs every `each_round` agent, plus the `first` agents when r == 0; a final phase after the
  last round runs the `last` agents. Within a phase, `{x}` waits for x's output of the same phase, so
  same-phase reads must form a DAG; `{x.prev}` reads x's output of the previous round ("" in round 0).
- Outside its phase, `{x}` reads x's latest output: a `first` agent's stays readable in later rounds,
  and `last` agents read the final round's outputs.
- `rounds=N` runs N rounds; `until=f, max_iters=N` runs up to N rounds and stops after the first round
  whose outputs satisfy f(outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .agent import Agent
from .errors import PipelineError
from .placement import Placement
from .template import QUERY, Placeholder
from .tool import Tool

if TYPE_CHECKING:
    from .run_state import RunResult

StopCondition = Callable[[Mapping[str, str]], bool]


@dataclass(frozen=True)
class Phase:
    """A round (`index` = round number) or the final phase of `last` agents (`final` = True)."""

    index: int
    final: bool = False

    def runs(self, agent: Agent) -> bool:
        if self.final:
            return agent.runs == "last"
        return agent.runs == "each_round" or (agent.runs == "first" and self.index == 0)

    def __str__(self) -> str:
        return "final phase" if self.final else f"round {self.index}"


class Pipeline:
    def __init__(
        self,
        name: str,
        agents: Sequence[Agent],
        *,
        tools: Sequence[Tool] = (),
        rounds: int = 1,
        until: StopCondition | None = None,
        max_iters: int | None = None,
        outputs: Sequence[str] | None = None,
        agent_placement: Placement | Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        # where this pipeline's agent actors run (fields left None: the session's defaults); see placement.py
        try:
            self.agent_placement = Placement.of(agent_placement)
        except ValueError as exc:
            raise PipelineError(f"pipeline {name!r}: {exc}") from None
        self.agents = _unique(agents, "agent")
        self.tools = _unique(tools, "tool")
        self.until = until
        self.rounds = _round_count(rounds, until, max_iters)
        self._check_names()
        self._check_placeholders()
        for phase in (Phase(0), Phase(1), Phase(0, final=True)):
            self.order(phase)  # raises on a same-phase cycle
        self._check_reachable()
        self.outputs = self._outputs(outputs)

    # -- running -------------------------------------------------------------------------------------
    def run(self, query: str, **options: Any) -> RunResult:
        """Run on the registered executor (`import kvmesh`: Ray actors and workers) and return the result."""
        from .executor import get_executor

        return get_executor().run(self, query, **options)

    def stream(self, query: str, **options: Any) -> Iterator[Any]:
        """Run on the registered executor, yielding events (tokens, agents done) and finally the result."""
        from .executor import get_executor

        return get_executor().stream(self, query, **options)

    def with_agent_options(self, **changes: Any) -> Pipeline:
        """A copy whose every agent has these fields changed, e.g. `max_tokens=16` for a quick try."""
        agents = [replace(agent, **changes) for agent in self.agents.values()]
        loop = {"until": self.until, "max_iters": self.rounds} if self.until else {"rounds": self.rounds}
        return Pipeline(
            self.name,
            agents,
            tools=list(self.tools.values()),
            outputs=self.outputs,
            agent_placement=self.agent_placement,
            **loop,
        )

    # -- the graph ---------------------------------------------------------------------------------
    def sources(self, agent: Agent) -> list[Placeholder]:
        """What the agent reads: its placeholders, with each tool replaced by the tool's own inputs."""
        found: dict[str, Placeholder] = {}
        for placeholder in agent.placeholders:
            if placeholder.source in self.tools:
                for name in self.tools[placeholder.source].inputs:
                    found.setdefault(name, Placeholder(name))
            else:
                found.setdefault(placeholder.key, placeholder)
        return list(found.values())

    def upstream(self, name: str, phase: Phase) -> list[str]:
        """Agents of the same phase whose output `name` waits for."""
        return [
            p.source
            for p in self.sources(self.agents[name])
            if not p.previous_round and p.source in self.agents and phase.runs(self.agents[p.source])
        ]

    def downstream(self, name: str, phase: Phase) -> list[str]:
        """Agents of the same phase that wait for `name`'s output."""
        return [
            other for other in self.agents if phase.runs(self.agents[other]) and name in self.upstream(other, phase)
        ]

    def order(self, phase: Phase) -> list[str]:
        """The phase's agents in an order where every agent comes after those it waits for."""
        members = [name for name, agent in self.agents.items() if phase.runs(agent)]
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name) :], name])
                raise PipelineError(
                    f"pipeline {self.name!r}: agents read each other in the same {phase}: {cycle}. "
                    "Declare the loop: read the previous round with {agent.prev} and set rounds= or until=/max_iters="
                )
            visiting.append(name)
            for source in self.upstream(name, phase):
                visit(source)
            visiting.pop()
            done.append(name)

        for name in members:
            visit(name)
        return done

    # -- checks ------------------------------------------------------------------------------------
    def _check_names(self) -> None:
        clash = set(self.agents) & set(self.tools)
        if clash:
            raise PipelineError(f"pipeline {self.name!r}: {sorted(clash)} name both an agent and a tool")
        if QUERY in self.tools:
            raise PipelineError("a tool cannot be named 'query': {query} is the user's input")
        if not self.agents:
            raise PipelineError(f"pipeline {self.name!r} has no agents")

    def _check_placeholders(self) -> None:
        known = {QUERY, *self.agents, *self.tools}
        for agent in self.agents.values():
            for placeholder in agent.placeholders:
                where = f"agent {agent.name!r}: {{{placeholder.key}}}"
                if placeholder.source not in known:
                    raise PipelineError(f"{where} names nothing; known: {', '.join(sorted(known))}")
                if placeholder.previous_round:
                    self._check_prev(agent, placeholder, where)
            for placeholder in self.sources(agent):
                source = self.agents.get(placeholder.source)
                if placeholder.source not in known:
                    raise PipelineError(f"agent {agent.name!r} uses a tool that reads {placeholder.source!r}, unknown")
                if source is not None and source.runs == "last" and agent.runs != "last":
                    raise PipelineError(
                        f"agent {agent.name!r} reads {{{placeholder.key}}}, but {source.name!r} runs only after the "
                        "rounds (runs='last')"
                    )

    def _check_prev(self, agent: Agent, placeholder: Placeholder, where: str) -> None:
        source = self.agents.get(placeholder.source)
        if source is None:
            raise PipelineError(f"{where}: only agents have a previous round")
        if source.runs != "each_round":
            raise PipelineError(f"{where}: {source.name!r} does not run every round (runs={source.runs!r})")
        if agent.runs != "each_round":
            raise PipelineError(
                f"{where}: an agent with runs={agent.runs!r} has no previous round; read {{{source.name}}}"
            )
        if self.rounds == 1 and self.until is None:
            raise PipelineError(f"{where}: the pipeline runs one round; set rounds= or until=/max_iters=")

    def _check_reachable(self) -> None:
        """Every agent must see the query, directly or through what it reads; else nothing reaches it."""
        reached: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, agent in self.agents.items():
                if name not in reached and any(p.source == QUERY or p.source in reached for p in self.sources(agent)):
                    reached.add(name)
                    changed = True
        missing = [name for name in self.agents if name not in reached]
        if missing:
            raise PipelineError(
                f"pipeline {self.name!r}: nothing reaches {missing}: neither the query nor any agent that sees it "
                "flows into their templates; add {query} or an upstream placeholder"
            )

    def _outputs(self, outputs: Sequence[str] | None) -> tuple[str, ...]:
        read = {p.source for agent in self.agents.values() for p in self.sources(agent)}
        if outputs is None:
            sinks = [name for name in self.agents if name not in read]
            return tuple(sinks or self.agents)
        unknown = [name for name in outputs if name not in self.agents]
        if unknown:
            raise PipelineError(f"pipeline {self.name!r}: outputs {unknown} are not agents")
        needed = set(outputs)
        frontier = list(outputs)
        while frontier:
            for p in self.sources(self.agents[frontier.pop()]):
                if p.source in self.agents and p.source not in needed:
                    needed.add(p.source)
                    frontier.append(p.source)
        idle = [name for name in self.agents if name not in needed]
        if idle:
            raise PipelineError(f"pipeline {self.name!r}: agents {idle} feed none of the outputs {list(outputs)}")
        return tuple(outputs)


def _unique(items: Iterable[Agent] | Iterable[Tool], kind: str) -> dict:
    found: dict = {}
    for item in items:
        if item.name in found:
            raise PipelineError(f"two {kind}s are named {item.name!r}; names must be unique")
        found[item.name] = item
    return found


def _round_count(rounds: int, until: StopCondition | None, max_iters: int | None) -> int:
    if until is None:
        if max_iters is not None:
            raise PipelineError("max_iters= bounds an until= loop; for a fixed number of rounds use rounds=")
        if rounds < 1:
            raise PipelineError(f"rounds must be >= 1, got {rounds}")
        return rounds
    if rounds != 1:
        raise PipelineError("give either rounds= (a fixed count) or until= with max_iters=, not both")
    if max_iters is None or max_iters < 1:
        raise PipelineError("until= needs max_iters= (>= 1) so the loop always ends")
    if not callable(until):
        raise PipelineError("until= must be a callable taking the round's outputs {agent: text}")
    return max_iters
