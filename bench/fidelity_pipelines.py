"""The pipelines `kvmesh bench fidelity` runs, one per item shape, written as a user would write them:
agents with templates, a tool that returns the passage (relay, critique) or the retrieved documents (one
segment each, as DocumentStore's retriever returns them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvmesh.agents import Agent, Pipeline, Tool

from .fidelity_items import Item, ItemSet

T = TypeVar("T")

READER = (
    "Read the passage, then write down the facts from it that answer the question.\n\n"
    "Passage:\n{passage}\n\nQuestion: {query}"
)
RELAY_ANSWERER = (
    "A colleague read a passage for you and noted the facts that answer a question.\n\n"
    "Notes:\n{reader}\n\nQuestion: {query}\nAnswer in a few words."
)
RETRIEVAL_SYSTEM = "You answer questions using the documents you are given."
RETRIEVAL_ANSWERER = "Documents:\n{documents}\n\nQuestion: {query}\nAnswer in a few words."
SOLVER = "Passage:\n{passage}\n\nQuestion: {query}\nAnswer in a few words."
CRITIC = (
    "Passage:\n{passage}\n\nQuestion: {query}\nProposed answer: {solver}\n\n"
    "Check the proposed answer against the passage: is it right? If not, what is the right answer?"
)
REVISER = (
    "Passage:\n{passage}\n\nQuestion: {query}\nYour first answer: {solver}\n"
    "A reviewer's comments: {critic}\n\nGive your final answer in a few words."
)
# output budgets: notes and critiques need room; an answer is a name or a number in a short sentence
MAX_TOKENS = {"reader": 48, "answerer": 16, "solver": 16, "critic": 40, "reviser": 16}


@dataclass(frozen=True)
class ShapePipeline:
    pipeline: Pipeline
    shared_agent: str | None  # the first call: run once per item, densely, and shared by every mode
    scored_agent: str  # whose reply is scored


def shape_pipeline(shape: str, items: ItemSet) -> ShapePipeline:
    if shape == "relay":
        agents = [
            Agent("reader", READER, max_tokens=MAX_TOKENS["reader"]),
            Agent("answerer", RELAY_ANSWERER, max_tokens=MAX_TOKENS["answerer"]),
        ]
        return ShapePipeline(Pipeline("relay", agents, tools=[_passages(shape, items)]), "reader", "answerer")
    if shape == "retrieval":
        answerer = Agent("answerer", RETRIEVAL_ANSWERER, system=RETRIEVAL_SYSTEM, max_tokens=MAX_TOKENS["answerer"])
        return ShapePipeline(Pipeline("retrieval", [answerer], tools=[_retriever(items)]), None, "answerer")
    if shape == "critique":
        agents = [
            Agent("solver", SOLVER, max_tokens=MAX_TOKENS["solver"]),
            Agent("critic", CRITIC, max_tokens=MAX_TOKENS["critic"]),
            Agent("reviser", REVISER, max_tokens=MAX_TOKENS["reviser"]),
        ]
        return ShapePipeline(Pipeline("critique", agents, tools=[_passages(shape, items)]), "solver", "reviser")
    raise ValueError(f"no item shape {shape!r}: use relay, retrieval or critique")


def _passages(shape: str, items: ItemSet) -> Tool:
    """A tool reading {query} (the question) that returns its item's passage."""
    by_question = _by_question(shape, items, lambda item: item.passage)
    return Tool("passage", lambda query: by_question[query])


def _retriever(items: ItemSet) -> Tool:
    """A tool reading {query} that returns the question's documents, gold among distractors, as a list."""
    by_question = _by_question("retrieval", items, lambda item: [items.documents[d] for d in item.documents])
    return Tool("documents", lambda query: by_question[query])


def _by_question(shape: str, items: ItemSet, value: Callable[[Item], T]) -> dict[str, T]:
    found: dict[str, T] = {}
    for item in items.items[shape]:
        if item.question in found:
            raise ValueError(f"two {shape} items ask {item.question!r}: a tool finds its item by the question")
        found[item.question] = value(item)
    return found
