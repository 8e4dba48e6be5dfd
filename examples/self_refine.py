"""Self-refine: a writer drafts, a critic reviews, the writer revises from its last draft and the critique,
until the critic approves (or three rounds have run).

    kvmesh run examples/self_refine.py --query "A two-line poem about autumn rain."
"""

from kvmesh import self_refine


def approved(outputs: dict[str, str]) -> bool:
    return "APPROVED" in outputs["critic"].upper()


pipeline = self_refine(
    "self_refine",
    writer=("writer", "Write the text asked for. If there is a previous draft and a critique, revise the draft."),
    critic=("critic", "Critique the draft in one or two sentences. If it needs no change, answer only APPROVED."),
    until=approved,
    max_iters=3,
    max_tokens=80,
)
