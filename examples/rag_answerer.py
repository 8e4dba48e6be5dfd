"""Retrieval-augmented answering: a tool retrieves passages for the query (in the agent's own process),
an answerer answers from them, and a checker checks the answer against the same passages.

    kvmesh run examples/rag_answerer.py --query "How tall is the Eiffel Tower?"
"""

import re

from kvmesh import Agent, Pipeline, tool

CORPUS = [
    "The Eiffel Tower in Paris is 330 metres tall and was completed in 1889 for the World's Fair.",
    "Mount Everest, on the border of Nepal and China, rises 8,849 metres above sea level.",
    "The Great Wall of China stretches over 21,000 kilometres across northern China.",
    "The Statue of Liberty was a gift from France to the United States, dedicated in 1886.",
    "Python was created by Guido van Rossum and first released in 1991.",
    "The Amazon is the largest rainforest on Earth, covering about 5.5 million square kilometres.",
]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


@tool
def passages(query: str) -> str:
    """The two passages sharing the most words with the query."""
    ranked = sorted(CORPUS, key=lambda passage: len(_words(query) & _words(passage)), reverse=True)
    return "\n".join(f"- {passage}" for passage in ranked[:2])


pipeline = Pipeline(
    "rag_answerer",
    [
        Agent(
            "answerer",
            "Passages:\n{passages}\n\nUsing only the passages, answer in one sentence: {query}",
            max_tokens=48,
        ),
        Agent(
            "checker",
            "Passages:\n{passages}\n\nQuestion: {query}\nAnswer: {answerer}\n\n"
            "Is the answer supported by the passages? Reply 'supported' or 'unsupported', then one short reason.",
            max_tokens=32,
        ),
    ],
    tools=[passages],
)
