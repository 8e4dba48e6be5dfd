"""A 3-agent debate: two debaters answer and rebut each other for two rounds; a judge reads their last words.

kvmesh run examples/debate.py --query "Is remote work better than office work for junior engineers?"
"""

from kvmesh import debate

pipeline = debate(
    "debate",
    {
        "pro": "You argue FOR the proposition. Answer in two or three sentences; rebut the other side if it spoke.",
        "con": "You argue AGAINST the proposition. Answer in two or three sentences; rebut the other side if it spoke.",
    },
    judge=("judge", "You are the judge. Say which side argued better, and why, in two sentences."),
    rounds=2,
    max_tokens=80,
)
