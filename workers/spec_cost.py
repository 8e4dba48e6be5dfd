"""When speculation pays: the cost of a forward by its row count, and how many draft nodes each step buys.

A decode-only forward of N rows costs t(N) ~ a + b*N: a is streaming the weights once (the floor of any
step), b the extra work per row. On the 2-core dev CPU, with decodes and trees in onnxruntime's step graph,
b/a is ~0.1 (a 5-row verify costs ~1.4 decode steps, a 17-row one ~2.5: at 17 rows fp32's matmuls are
compute-bound); on a GPU it is far smaller. The model starts from that ratio, scaled by the first measured step, and is
then fit online, by exponentially decayed least squares, to the steps the engine actually runs. On a
shared machine a step can stall for another process, so each observation is clipped to a few times the
prediction and the slope ratio is bounded: a burst of stalls must not switch speculation off for good.

Planning a step: every candidate draft node carries the probability that it will be accepted (its path
probability in the suffix tree, times the request's recent calibration). Taking nodes best first, one
more node is worth it while p > tokens * (t(N + 1) / t(N) - 1), i.e. while it raises the step's expected
tokens per second. A large batch (many tokens already per step) or a poorly calibrated request (low p)
thus drafts little or nothing: speculation turns itself off where it would not pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PRIOR_ROW_RATIO = 0.1  # b / a measured on the 2-core dev machine (bench/NOTES.md)
MAX_ROW_RATIO = 0.25  # a 17-row forward at most ~5 one-row steps, however noisy the measurements
OUTLIER = 3.0  # an observation above this multiple of the prediction counts as this multiple


class StepCostModel:
    def __init__(self, prior_ratio: float = PRIOR_ROW_RATIO, decay: float = 0.99, prior_weight: float = 4.0) -> None:
        self.prior_ratio = prior_ratio
        self.decay = decay
        self.prior_weight = prior_weight
        self._sums = [0.0] * 5  # decayed sums of w, w*x, w*x^2, w*y, w*x*y
        self.observations = 0
        self.a = 0.0  # seconds per forward, fixed part
        self.b = 0.0  # seconds per row

    @property
    def ready(self) -> bool:
        return self.observations > 0

    def observe(self, rows: int, seconds: float) -> None:
        """One decode-only forward of `rows` rows that took `seconds`."""
        if rows < 1 or seconds <= 0:
            return
        if not self.observations:  # the prior: a line through this point with slope ratio * intercept
            a = seconds / (1 + self.prior_ratio * rows)
            for x in (1, 17):
                self._add(x, a * (1 + self.prior_ratio * x), self.prior_weight)
        else:
            seconds = min(seconds, OUTLIER * self.predict(rows))
        self.observations += 1
        self._sums = [s * self.decay for s in self._sums]
        self._add(rows, seconds, 1.0)
        self._fit()

    def _add(self, x: float, y: float, w: float) -> None:
        for i, v in enumerate((w, w * x, w * x * x, w * y, w * x * y)):
            self._sums[i] += v

    def _fit(self) -> None:
        w, sx, sxx, sy, sxy = self._sums
        var = sxx * w - sx * sx
        if var <= 1e-9 * w * w:  # all at one row count: keep the prior's slope ratio
            self.a = sy / (w + self.prior_ratio * sx)
            self.b = self.prior_ratio * self.a
            return
        b = (sxy * w - sx * sy) / var
        a = (sy - b * sx) / w
        if a <= 0 or b < 0 or b > MAX_ROW_RATIO * a:  # noise tilted the line: the prior ratio through the mean
            a = sy / (w + self.prior_ratio * sx)
            b = self.prior_ratio * a
        self.a, self.b = a, b

    def predict(self, rows: int) -> float:
        return self.a + self.b * rows

    def as_dict(self) -> dict[str, float | int]:
        table: dict[str, float | int] = {
            "fixed_ms": 1e3 * self.a,
            "per_row_ms": 1e3 * self.b,
            "observations": self.observations,
        }
        if self.ready:
            table.update({f"t{n}_over_t1": self.predict(n) / self.predict(1) for n in (2, 5, 9, 17, 33)})
        return table


@dataclass
class Candidate:
    """One request's draft on offer: node acceptance probabilities, non-increasing (best-first order)."""

    key: str
    probs: Sequence[float]


def plan_step(
    cost: StepCostModel,
    candidates: Sequence[Candidate],
    base_rows: int,
    base_tokens: int,
    budget: int,
    margin: float = 1.1,
) -> dict[str, int]:
    """How many leading nodes of each draft to verify this step.

    base_rows: rows the forward has without drafts; base_tokens: tokens it yields without drafts (one per
    decoding request); budget: the most draft rows allowed; margin: a node must beat break-even by this.
    """
    if not cost.ready:  # no measurement yet: the first step runs plain and measures
        return {}
    nodes = sorted(((p, i, c.key) for c in candidates for i, p in enumerate(c.probs)), key=lambda n: (-n[0], n[1]))
    taken: dict[str, int] = {}
    rows, tokens = base_rows, float(base_tokens)
    for p, index, key in nodes:
        if budget <= 0:
            break
        if taken.get(key, 0) != index:
            continue  # an earlier node of this draft was refused: its subtree must go too
        step = cost.predict(rows)
        if p <= margin * tokens * (cost.predict(rows + 1) - step) / step:
            break  # later nodes are no more likely and the bar only rises
        taken[key] = index + 1
        rows, tokens, budget = rows + 1, tokens + p, budget - 1
    return taken
