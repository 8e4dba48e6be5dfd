"""The bundled demo: a planner, two specialists in parallel, and a judge, on SmolLM2-135M.

Every template opens with the question, so all four prompts share a prefix (the model's default
system prompt, then the question): the worker's exact prefix cache serves it to the later agents (the
`cached` column of the table). The judge reads both specialists, who both read the planner.
"""

from __future__ import annotations

from kvmesh.agents import Agent, Pipeline

DEMO_QUERY = "Should a small team rewrite its Python web service in Rust?"
DEMO_MAX_TOKENS = 64
OPENING = "Question: {query}\n\n"


def demo_pipeline(max_tokens: int = DEMO_MAX_TOKENS) -> Pipeline:
    def agent(name: str, body: str) -> Agent:
        return Agent(name, OPENING + body, max_tokens=max_tokens)

    return Pipeline(
        "demo",
        [
            agent("planner", "List the two or three main factors to weigh before deciding. One line each."),
            agent(
                "advocate",
                "Factors:\n{planner}\n\nYou are the advocate. In two sentences, make the case for doing it.",
            ),
            agent(
                "critic",
                "Factors:\n{planner}\n\nYou are the critic. In two sentences, make the case against doing it.",
            ),
            agent(
                "judge",
                "Case for:\n{advocate}\n\nCase against:\n{critic}\n\n"
                "You are the judge. Decide, and explain why in two sentences.",
            ),
        ],
    )
