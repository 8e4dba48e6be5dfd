"""auto's guard: a template reuses only after audits of its own dense calls pass, and stops when they fail."""

from __future__ import annotations

import math

import pytest

from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore
from kvmesh.workers.engine import EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.reuse_guard import Audit, GuardConfig, ReuseGuard, audit_reuse
from kvmesh.workers.reuse_planner import PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.worker import WorkerConfig, build_worker

PASS, FAIL = Audit(kl=0.001, same_first_token=True), Audit(kl=0.5, same_first_token=False)


def test_a_template_opens_after_audits_in_a_row_pass_and_closes_at_the_first_failure():
    guard = ReuseGuard(GuardConfig(min_audits=2, max_kl=0.01, audit_every=3))
    first = guard.admit("t")
    assert (first.reuse, first.audit) == (False, True) and "0 of 2 audits" in first.reason
    guard.record("t", PASS)
    guard.record("t", None)  # the anchors did not vouch: no verdict, the count stands
    assert not guard.is_open("t")
    guard.record("t", Audit(kl=0.001, same_first_token=False))  # another first token: a failure
    guard.record("t", PASS)
    guard.record("t", PASS)
    assert guard.is_open("t") and not guard.is_open("another template")
    admitted = [guard.admit("t") for _ in range(6)]  # calls 2..7 of the template: every third is audited
    assert [(a.reuse, a.audit) for a in admitted] == [(True, False), (False, True), (True, False)] * 2
    assert "one call in 3 runs dense" in admitted[1].reason
    guard.record("t", Audit(kl=0.02, same_first_token=True))  # over max_kl
    assert not guard.is_open("t") and not guard.admit("t").reuse


def test_a_template_that_keeps_failing_is_audited_one_call_in_audit_every():
    guard = ReuseGuard(GuardConfig(min_audits=2, max_kl=0.01, audit_every=4))
    for _ in range(2):
        assert guard.admit("t").audit
        guard.record("t", FAIL)
    admitted = [guard.admit("t") for _ in range(8)]  # calls 3..10: audits at 4 and 8 only
    assert [a.audit for a in admitted] == [False, True, False, False, False, True, False, False]
    assert not any(a.reuse for a in admitted) and "2 failed in a row" in admitted[0].reason
    guard.record("t", PASS)  # a pass resets the failures: every call is audited again
    assert guard.admit("t").audit and guard.admit("t").audit


def test_guard_settings_are_validated():
    for bad in ({"min_audits": 0}, {"audit_every": 1}, {"max_kl": -1.0}, {"max_kl": math.nan}):
        with pytest.raises(ValueError):
            GuardConfig(**bad)


@pytest.mark.slow
def test_an_audit_of_the_exact_kv_passes_and_of_moved_kv_does_not(model, tokenizer):
    ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Name the capital of Peru, briefly."}]))
    real = model.new_cache(capacity=len(ids))
    model.forward(ForwardBatch.single(real, ids))
    start, end = 5, len(ids) - 6
    exact = audit_reuse(model, real, ids, start, end, real.slice(start, end))
    assert exact.same_first_token and exact.kl < 1e-6
    lost = real.slice(start, end)
    lost.values.zero_()  # what the span says is gone: the reply's start must feel it
    wrong = audit_reuse(model, real, ids, start, end, lost)
    assert wrong.kl > 0.05, wrong


@pytest.mark.slow
def test_auto_opens_on_traffic_reuse_serves_well_and_closes_when_the_traffic_changes(model, tokenizer):
    """One agent's template; first the same kind of request again and again (anchors of the very same text
    restore dense's KV: audits pass), then requests unlike the anchors, which a lenient match would still
    vouch for: the first audit after the change closes the template."""
    lenient = MatchConfig(max_distance=math.inf, entropy_gamma=1.0, max_spread=math.inf)
    guard = GuardConfig(min_audits=2, max_kl=0.01, audit_every=3)
    settings = WorkerConfig(engine=EngineConfig(speculation=None), match=lenient, guard=guard, warm_up=False)
    worker = build_worker(settings, MemoryStore(), model=model, tokenizer=tokenizer)

    def call(text: str) -> str:
        part = PromptPart(text, segment_id("query", text), "query")
        planned = worker.planner.plan("You are brief.", [PromptPart("Summarize in five words: "), part], "w", "auto")
        request = worker.engine.add_request(planned.token_ids, SamplingParams(max_tokens=1), reuse=planned.reuse)
        while not any(event.finished and event.request_id == request for event in worker.engine.step()):
            pass
        worker.planner.drain()  # the audit lands before the next call
        return planned.stats.mode

    same = (
        "The river Arlen floods its valley every spring, and each summer the people of Dunmere rebuild the "
        "mills, the bridges and the long stone wall that the water took."
    )
    before = [call(same) for _ in range(8)]
    # calls 1-2 record anchors (one is too few to vouch), 3-4 are audited and pass, then reuse, every third audited
    assert before[:4] == ["prefix"] * 4 and before[4] == "kvcomm", before
    (template,) = worker.planner.guard._templates
    assert before.count("kvcomm") >= 3 and worker.planner.guard.is_open(template)
    unlike = [f"{n} + {n * 7} = {n * 8}, and {n} squared is {n * n}." for n in range(3, 9)]  # shorter: covered
    after = [call(text) for text in unlike]
    # at most audit_every - 1 calls reuse before an audit sees the change; from then on: dense
    first_dense = after.index("prefix")
    assert first_dense < guard.audit_every and set(after[first_dense:]) == {"prefix"}, after
    assert not worker.planner.guard.is_open(template)
