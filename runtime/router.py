"""Which worker serves an agent's call: a pure function over what the registry knows.

In order of preference (the shape of SGLang's cache-aware router and Ray Serve's prefix-affinity
router): the worker that holds most of the request's segments; then the worker this agent used
before, whose prefix cache holds its system prompt and template; then the least loaded. Affinity
yields to load when the preferred worker runs `imbalance` or more calls beyond the least loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_IMBALANCE = 4


@dataclass(frozen=True)
class WorkerLoad:
    name: str
    in_flight: int  # calls routed there and not yet finished


def choose_worker(
    workers: Sequence[WorkerLoad],
    segment_holders: Sequence[str | None],
    previous: str | None,
    imbalance: int = DEFAULT_IMBALANCE,
) -> str:
    """The chosen worker's name.

    segment_holders: for each segment of the request, the worker that produced it (None: unknown).
    previous: the worker this agent's last call ran on (None: first call, or it is gone).
    Ties break towards `previous`, then fewer calls in flight, then the name (deterministic).
    """
    if not workers:
        raise ValueError("no workers are registered")
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    load = {w.name: w.in_flight for w in workers}
    least = min(load.values())

    def balanced(name: str) -> bool:
        return load[name] - least < imbalance

    held = Counter(h for h in segment_holders if h in load)
    candidates = [name for name in held if balanced(name)]
    if candidates:
        return min(candidates, key=lambda n: (-held[n], n != previous, load[n], n))
    if previous in load and balanced(previous):
        return previous
    return min(load, key=lambda n: (load[n], n))
