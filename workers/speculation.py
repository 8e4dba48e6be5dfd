"""Speculative decoding inside the engine: draft from suffix trees, verify as a tree in one forward, accept.

A speculating request's chunk in a step is its pending token followed by the draft's nodes. Node i sits
at position past + depth(i) and attends to the whole context, its ancestors and itself (the tree mask),
so its logits are exactly what plain decoding would compute after that path. Acceptance walks down from
the pending token: at each node it draws the next token the way plain decoding would, with the
request's own sampler (argmax when greedy), and moves into the child holding that token, if any. The
emitted tokens are the accepted path plus the token drawn at its end, so:
- greedy output is the plain greedy output (up to fp32 rounding in the wider forward; see the tests);
- sampled output follows the model's distribution: for a deterministic draft token x this accepts x with
  probability p(x) and otherwise emits a draw from p conditioned on "not x" - exactly the standard
  speculative-sampling rule (accept with min(1, p/q), q a point mass; resample from norm(max(p - q, 0))),
  siblings included (SpecInfer's multi-candidate rule with point-mass drafts). As one draw is made per
  emitted token, in order, a seeded request emits the same tokens with speculation on or off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, sample
from .spec_cost import Candidate, StepCostModel, plan_step
from .suffix_cache import Draft, SuffixCache, SuffixCacheConfig


@dataclass(frozen=True)
class SpeculationConfig:
    suffix: SuffixCacheConfig = field(default_factory=SuffixCacheConfig)
    max_batch: int = 32  # no drafting at all when more requests decode in one step
    adaptive: bool = True  # cost model + calibration choose draft lengths; False: verify every draft whole
    calibration_decay: float = 0.5  # weight of the newest verify in a request's calibration
    calibration_recovery: float = 0.1  # pull toward 1 per step without a draft, so a request retries

    def __post_init__(self) -> None:
        if self.max_batch < 1 or not 0 < self.calibration_decay <= 1 or not 0 <= self.calibration_recovery <= 1:
            raise ValueError("max_batch must be >= 1, calibration_decay in (0, 1], calibration_recovery in [0, 1]")


@dataclass
class SpeculationStats:
    """Totals over every request since the engine started (benchmarks read them); a call's own drafted and
    accepted tokens are in its CallStats."""

    verify_steps: int = 0  # request-steps that verified a draft
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0  # drafting and planning
    update_s: float = 0.0  # adding verified tokens to the trees


def tree_inputs(draft: Draft, past: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [1 + n] and attention mask [1 + n, past + 1 + n] (True = may attend) of a verify chunk.

    Row 0 is the pending token at position `past`; row i + 1 is draft node i at past + its depth.
    """
    n = len(draft)
    depth = [0] * (n + 1)
    rows = [[True] + [False] * n]  # the pending token sees itself (and the whole past)
    for i, parent in enumerate(draft.parents):
        depth[i + 1] = depth[parent + 1] + 1
        row = list(rows[parent + 1])
        row[i + 1] = True
        rows.append(row)
    tree = torch.tensor(rows, dtype=torch.bool)  # [1 + n, 1 + n] ancestors-or-self
    mask = torch.cat([torch.ones(n + 1, past, dtype=torch.bool), tree], dim=1)
    positions = past + torch.tensor(depth, dtype=torch.long)
    return positions.to(device) if device else positions, mask.to(device) if device else mask


def verify(
    draft: Draft, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], list[int]]:
    """Walk the draft along the model's own choices. logits [1 + n, V], row 0 = the pending token.

    Returns (accepted node indices, root to leaf; emitted tokens = their tokens + the next one drawn).
    """
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(draft.tokens, draft.parents, strict=True)):
        children.setdefault(parent, {})[token] = i
    path: list[int] = []
    tokens: list[int] = []
    node = -1
    while True:
        token = sample(logits[node + 1], sampling, generator)
        tokens.append(token)
        node = children.get(node, {}).get(token, -2)
        if node == -2:
            return path, tokens
        path.append(node)


class Speculator:
    """The engine's speculation state: the suffix cache, the step cost model, per-request calibration."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.cache = SuffixCache(config.suffix)
        self.cost = StepCostModel()
        self.stats = SpeculationStats()
        self._calibration: dict[str, float] = {}  # request -> recent accepted / expected

    def propose(self, requests: list[tuple[str, list[int], int]], base_rows: int, budget: int) -> dict[str, Draft]:
        """Drafts worth verifying this step. requests: (id, context, most draft tokens it may use)."""
        if not requests or len(requests) > self.config.max_batch or budget <= 0:
            return {}
        started = time.perf_counter()
        drafts: dict[str, Draft] = {}
        for key, context, limit in requests:
            if not self.cache.running(key):
                continue
            draft = self.cache.draft(key, context, limit)
            if len(draft):
                drafts[key] = draft
            else:  # nothing to offer counts as a step without a draft
                self._recover(key)
        if self.config.adaptive:
            offers = [
                Candidate(k, [min(1.0, p * self._calibration.get(k, 1.0)) for p in d.probs]) for k, d in drafts.items()
            ]
            lengths = plan_step(self.cost, offers, base_rows, len(requests), budget)
        else:
            lengths = {k: len(d) for k, d in drafts.items()}
            total = 0
            for k in lengths:
                lengths[k] = min(lengths[k], budget - total)
                total += lengths[k]
        chosen = {k: drafts[k].prefix(n) for k, n in lengths.items() if n > 0}
        for key in drafts.keys() - chosen.keys():
            self._recover(key)
        self.stats.draft_s += time.perf_counter() - started
        return chosen

    def _recover(self, key: str) -> None:
        c = self._calibration.get(key)
        if c is not None:
            self._calibration[key] = c + self.config.calibration_recovery * (1.0 - c)

    def verified(self, key: str, draft: Draft, accepted: int) -> None:
        """A draft of `key` was verified and `accepted` of its nodes kept."""
        expected = max(draft.score, 1e-6)
        old = self._calibration.get(key, 1.0)
        w = self.config.calibration_decay
        self._calibration[key] = min(2.0, (1 - w) * old + w * accepted / expected)
        self.stats.verify_steps += 1
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted

    def add_tokens(self, key: str, prompt: list[int], output: list[int], new: int, role: str | None) -> None:
        """The last `new` tokens of `output` were verified (a request's first call also loads its prompt)."""
        started = time.perf_counter()
        if not self.cache.running(key):
            self.cache.start(key, prompt, role)
            new = len(output)
        self.cache.extend(key, output[len(output) - new :])
        self.stats.update_s += time.perf_counter() - started

    def finish(self, key: str) -> None:
        self.cache.stop(key)
        self._calibration.pop(key, None)

    def observe_step(self, rows: int, seconds: float) -> None:
        if rows <= 64:  # the regime drafts are decided in; big prefill chunks would skew the line
            self.cost.observe(rows, seconds)
