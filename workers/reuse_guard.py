"""auto's guard: a template reuses only while audits of its own dense calls show reuse keeps dense's reply.

Every dense call of a template (an agent's template: its slots) under `auto` is a free audit. After its
prefill, the KV that kvcomm would have assembled from the anchors at hand - what a reusing call gets - is
set beside the call's real KV where it shows: the next-token distribution where the reply starts (KL from
dense, same first token). A template opens once `min_audits` audits in a row pass; while open it serves
kvcomm where the anchors vouch, one call in `audit_every` still runs dense and is audited (traffic drifts),
and the first failing audit closes it. A closed template's calls are dense with nothing on their critical
path: base KVs, anchors and the audit are computed once the reply has started, on the planner's background
thread, and once `min_audits` audits in a row have failed only one call in `audit_every` pays for them (the
rest are plain dense calls: no background work beside the decoding of others). An audit whose anchors do
not vouch has no verdict: such a call would not have reused anyway.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .forward_batch import ForwardBatch
from .llama import LlamaModel


@dataclass(frozen=True)
class GuardConfig:
    min_audits: int = 3  # passing audits in a row before a template may reuse
    # an audit passes when reuse keeps the first token and its next-token KL from dense is at most this
    # (nats); bench/NOTES.md has the calibration (kvmesh bench fidelity, tune split)
    max_kl: float = 0.01
    audit_every: int = 4  # an open template still serves one call in this many densely, and audits it

    def __post_init__(self) -> None:
        if self.min_audits < 1 or self.audit_every < 2:
            raise ValueError(f"min_audits must be >= 1 and audit_every >= 2, got {self.min_audits}, {self.audit_every}")
        if not (self.max_kl >= 0 and math.isfinite(self.max_kl)):
            raise ValueError(f"max_kl must be a finite number >= 0, got {self.max_kl}")


@dataclass(frozen=True)
class Audit:
    kl: float  # KL(dense || reuse) of the next-token distributions where the reply starts, in nats
    same_first_token: bool

    def passes(self, config: GuardConfig) -> bool:
        return self.same_first_token and self.kl <= config.max_kl


@dataclass(frozen=True)
class Admission:
    reuse: bool  # the call may be served by kvcomm (if the anchors vouch)
    audit: bool  # else: a dense call whose base KVs, anchors and audit are computed in the background
    reason: str  # why not reuse ("" when it may)


@dataclass
class _Template:
    passed_in_row: int = 0
    failed_in_row: int = 0
    calls: int = 0


class ReuseGuard:
    """Per template: whether auto may reuse now, from the audits so far. Thread-safe."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._templates: dict[str, _Template] = {}
        self._lock = threading.Lock()

    def admit(self, template: str) -> Admission:
        """Whether this call of `template` may reuse, else whether it is audited, and why."""
        config = self.config
        with self._lock:
            state = self._templates.setdefault(template, _Template())
            state.calls += 1
            sampled = state.calls % config.audit_every == 0
            if state.passed_in_row < config.min_audits:
                backing_off = state.failed_in_row >= config.min_audits
                return Admission(
                    False,
                    sampled or not backing_off,
                    (
                        f"auto's guard: {state.passed_in_row} of {config.min_audits} audits in a row passed (the "
                        f"template reuses once reuse has kept dense's first token within KL {config.max_kl} on its "
                        "own calls)" + (f"; {state.failed_in_row} failed in a row" if state.failed_in_row else "")
                    ),
                )
            if sampled:
                return Admission(False, True, f"auto's guard: one call in {config.audit_every} runs dense to audit")
            return Admission(True, False, "")

    def record(self, template: str, audit: Audit | None) -> None:
        """An audit's verdict (None: the anchors did not vouch, no verdict)."""
        if audit is None:
            return
        with self._lock:
            state = self._templates.setdefault(template, _Template())
            passed = audit.passes(self.config)
            state.passed_in_row = state.passed_in_row + 1 if passed else 0
            state.failed_in_row = 0 if passed else state.failed_in_row + 1

    def is_open(self, template: str) -> bool:
        with self._lock:
            state = self._templates.get(template)
            return state is not None and state.passed_in_row >= self.config.min_audits


@torch.inference_mode()
def audit_reuse(model: LlamaModel, real: KVCache, ids: list[int], start: int, end: int, reused: KVCache) -> Audit:
    """real: a dense call's KV of its whole prompt `ids`; reused: what reuse would have put at [start, end).
    Compares the next-token distributions at the prompt's end: dense (its last token run again over the real
    KV before it) against reuse (the exact prefix, the reused span, then the rest of the prompt prefilled)."""
    dense_cache = real.slice(0, len(ids) - 1)
    dense = model.forward(ForwardBatch.single(dense_cache, ids[-1:]))[-1]  # [V]
    reuse_cache = real.slice(0, start)
    reuse_cache.append(reused)
    approximate = model.forward(ForwardBatch.single(reuse_cache, ids[end:]))[-1]  # [V]
    p, q = torch.log_softmax(dense.double(), -1), torch.log_softmax(approximate.double(), -1)
    return Audit(kl=float((p.exp() * (p - q)).sum()), same_first_token=int(dense.argmax()) == int(approximate.argmax()))
