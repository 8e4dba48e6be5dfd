"""What a request's sampling fields may hold: one check for the engine's SamplingParams and for an Agent.

Torch-free, so that kvmesh.agents (cheap to import, no engine) refuses when a pipeline is built what the
engine or the wire (worker.proto's Sampling: max_tokens uint32, seed uint64) would refuse later.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TypeGuard

MAX_TOKENS_LIMIT = 2**32 - 1  # Sampling.max_tokens is a uint32
SEED_LIMIT = 2**64 - 1  # Sampling.seed is a uint64
# Below this a temperature samples greedily: logits / T overflows as T -> 0, and the draw is the argmax anyway
GREEDY_BELOW = 1e-5


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; the message names the field and what to do."""


def check_sampling(max_tokens: object, temperature: object, top_p: object, seed: object, stop: object) -> None:
    """Raise InvalidRequestError naming the first field out of its range, and the range."""
    if not _is_integer(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequestError(f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {max_tokens!r}")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError(
            f"temperature must be a finite number >= 0 (0 = greedy; below {GREEDY_BELOW} counts as 0), "
            f"got {temperature!r}"
        )
    if not _is_number(top_p) or not 0 < top_p <= 1:  # (NaN fails the comparison)
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_integer(seed) or not 0 <= seed <= SEED_LIMIT):
        raise InvalidRequestError(f"seed must be None or an integer in [0, 2**64 - 1], got {seed!r}")
    if not isinstance(stop, tuple | list) or any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequestError(f"stop strings must be non-empty strings (a tuple of them), got {stop!r}")


def _is_integer(value: object) -> TypeGuard[int]:
    return isinstance(value, Integral) and not isinstance(value, bool)  # (a bool is an int by accident)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, Real) and not isinstance(value, bool)
