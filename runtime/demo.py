"""The bundled demo: a planner, two specialists in parallel and a judge, on SmolLM2-135M, answering three
questions about one project brief in one session.

Every template opens with the brief (a tool's output: a segment) and the question, so the four prompts of a
run share a prefix: the first agent computes it and the worker's exact prefix cache serves it to the others,
and from the second question on the brief itself is found there, whoever computed it. What reuses more
than that (KVCOMM) is `auto`'s to decide, call by call, once audits of dense calls show it keeps the
answers; the per-run table shows both, and TTFT falling as the cache fills. The judge reads both
specialists, who both read the planner.
"""

from __future__ import annotations

from kvmesh.agents import Agent, Pipeline, Tool

DEMO_QUESTIONS = (
    "Should the team rewrite the service in Rust?",
    "Which part of the service should they speed up first?",
    "How should they roll out a big change safely?",
)
DEMO_MAX_TOKENS = 48
BRIEF = (
    "Harbor is a four-person team that runs Tidewater, a Python web service for booking ferry tickets. "
    "Tidewater is about forty thousand lines of Flask code with a PostgreSQL database. It serves two "
    "thousand requests a minute at peak, and its slowest requests, the seat-map pages, take up to eight "
    "hundred milliseconds. Most of that time goes to building the seat maps in Python loops and to three "
    "database queries per page that could be one. The team knows Python well; one engineer has written a "
    "little Rust. Releases happen every two weeks, and a bad release last spring stopped bookings for an "
    "hour. The company wants faster pages before the summer season, in four months, without hiring."
)
OPENING = "Project brief:\n{brief}\n\nQuestion: {query}\n\n"


def demo_pipeline(max_tokens: int = DEMO_MAX_TOKENS) -> Pipeline:
    def agent(name: str, body: str) -> Agent:
        return Agent(name, OPENING + body, max_tokens=max_tokens)

    return Pipeline(
        "demo",
        [
            agent("planner", "List the two or three main factors to weigh. One line each."),
            agent("advocate", "Factors:\n{planner}\n\nYou are the advocate. In two sentences, argue for boldness."),
            agent("critic", "Factors:\n{planner}\n\nYou are the critic. In two sentences, argue for the safe option."),
            agent("judge", "For:\n{advocate}\n\nAgainst:\n{critic}\n\nYou are the judge. Decide, in two sentences."),
        ],
        tools=[Tool("brief", lambda: BRIEF)],
    )
