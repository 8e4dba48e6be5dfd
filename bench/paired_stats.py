"""Paired comparisons of two systems' right/wrong answers on the same items: how far apart their accuracies
are (a bootstrap interval over items) and whether they differ at all (McNemar's exact test)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_RESAMPLES = 2000


def paired_bootstrap_ci(
    system: Sequence[bool], reference: Sequence[bool], resamples: int = MIN_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of accuracy(system) - accuracy(reference), resampling items (each item keeps
    both of its outcomes) with a fixed seed."""
    if len(system) != len(reference):
        raise ValueError(f"paired outcomes need the same items: {len(system)} against {len(reference)}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not system:
        return 0.0, 0.0
    differences = np.asarray(system, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mcnemar_exact_p(system: Sequence[bool], reference: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: of the items the two systems disagree on, is the split between
    "only the system right" and "only the reference right" unlikely under a fair coin?"""
    if len(system) != len(reference):
        raise ValueError(f"paired outcomes need the same items: {len(system)} against {len(reference)}")
    only_system = sum(1 for s, r in zip(system, reference, strict=True) if s and not r)
    only_reference = sum(1 for s, r in zip(system, reference, strict=True) if r and not s)
    disagreements = only_system + only_reference
    if disagreements == 0:
        return 1.0
    tail = sum(math.comb(disagreements, k) for k in range(min(only_system, only_reference) + 1))
    return min(1.0, 2 * tail / 2**disagreements)
