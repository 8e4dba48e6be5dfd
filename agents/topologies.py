"""Ready-made pipelines for the common multi-agent shapes; each wires the placeholders for you.

Roles are given as {agent name: instruction}. Instructions are literal text (braces are escaped), and
every agent also sees the user's query.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .agent import Agent
from .pipeline import Pipeline, StopCondition


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _template(instruction: str, reads: list[str]) -> str:
    lines = [_literal(instruction), "", "Task: {query}"]
    lines += [f"\n{name.removesuffix('.prev')} wrote:\n{{{name}}}" for name in reads]
    return "\n".join(lines)


def chain(name: str, roles: Mapping[str, str], **agent_options: Any) -> Pipeline:
    """a -> b -> c: each agent reads the previous one's output."""
    names = list(roles)
    agents = [Agent(role, _template(roles[role], names[i - 1 : i]), **agent_options) for i, role in enumerate(names)]
    return Pipeline(name, agents)


def fan_out_in(name: str, workers: Mapping[str, str], aggregator: tuple[str, str], **agent_options: Any) -> Pipeline:
    """Every worker answers the query on its own; the aggregator reads them all."""
    agents = [Agent(worker, _template(text, []), **agent_options) for worker, text in workers.items()]
    agents.append(Agent(aggregator[0], _template(aggregator[1], list(workers)), **agent_options))
    return Pipeline(name, agents)


def fully_connected(name: str, roles: Mapping[str, str], rounds: int, **agent_options: Any) -> Pipeline:
    """Every round, every agent reads what all the others wrote in the previous round."""
    agents = [
        Agent(role, _template(text, [f"{other}.prev" for other in roles if other != role]), **agent_options)
        for role, text in roles.items()
    ]
    return Pipeline(name, agents, rounds=rounds)


def debate(
    name: str, debaters: Mapping[str, str], judge: tuple[str, str], rounds: int = 2, **agent_options: Any
) -> Pipeline:
    """Debaters answer and rebut each other for `rounds` rounds; the judge reads their final words."""
    pipeline = fully_connected(name, debaters, rounds, **agent_options)
    judge_agent = Agent(judge[0], _template(judge[1], list(debaters)), runs="last", **agent_options)
    return Pipeline(name, [*pipeline.agents.values(), judge_agent], rounds=rounds)


def self_refine(
    name: str,
    writer: tuple[str, str],
    critic: tuple[str, str],
    *,
    until: StopCondition,
    max_iters: int = 3,
    **agent_options: Any,
) -> Pipeline:
    """The writer drafts, the critic reviews; the writer revises from its last draft and the critique."""
    writer_name, critic_name = writer[0], critic[0]
    agents = [
        Agent(writer_name, _template(writer[1], [f"{writer_name}.prev", f"{critic_name}.prev"]), **agent_options),
        Agent(critic_name, _template(critic[1], [writer_name]), **agent_options),
    ]
    return Pipeline(name, agents, until=until, max_iters=max_iters, outputs=[writer_name])
