"""Run a pipeline in this process with any text function as the LLM: for tests and for trying a design."""

from __future__ import annotations

from collections.abc import Callable

from .agent import Agent
from .parts import Prompt
from .pipeline import Pipeline
from .render import render
from .run_state import RunResult, RunState

LLM = Callable[[Agent, Prompt], str]


def run_locally(pipeline: Pipeline, query: str, llm: LLM) -> RunResult:
    state = RunState(pipeline, query)
    while not state.finished:
        phase_outputs: dict[str, str] = {}
        for name in state.phase_agents():
            agent = pipeline.agents[name]
            values = state.external_inputs(name) | {
                source: phase_outputs[source] for source in pipeline.upstream(name, state.phase)
            }
            phase_outputs[name] = llm(agent, render(agent, pipeline.tools, values))
            state.record(name, phase_outputs[name])
        state.advance()
    return state.result()
