"""Planner → coder → reviewer: each agent reads the previous one's output.

kvmesh run examples/planner_coder_reviewer.py --query "Write a function that checks if a string is a palindrome."
"""

from kvmesh import Agent, Pipeline

pipeline = Pipeline(
    "planner_coder_reviewer",
    [
        Agent("planner", "Task: {query}\n\nWrite a short numbered plan (at most four steps) for solving it in Python."),
        Agent(
            "coder",
            "Task: {query}\n\nPlan:\n{planner}\n\nWrite the Python code that follows the plan.",
            max_tokens=160,
        ),
        Agent(
            "reviewer",
            "Task: {query}\n\nCode:\n{coder}\n\nReview the code: name one bug or risk, and how to fix it.",
            max_tokens=96,
        ),
    ],
)
