"""A call's CallStats, built once by the worker from the engine's counts and the planner's decision."""

from __future__ import annotations

import pytest

from kvmesh.workers.reuse_planner import ReuseStats
from kvmesh.workers.sequence import RequestStats
from kvmesh.workers.worker import CallStats


def engine_stats(cached: int, reused: int) -> RequestStats:
    return RequestStats(prompt_tokens=50, prefix_hit_tokens=cached, reused_tokens=reused, output_tokens=3)


@pytest.mark.parametrize(
    ("planned", "cached", "reused", "observed"),
    [
        ("kvcomm", 16, 24, "kvcomm"),  # the splice reused tokens: the plan's mode
        ("kvcomm", 16, 0, "prefix"),  # it reused nothing: what the cache gave
        ("blend", 0, 0, "dense"),
        ("prefix", 0, 0, "dense"),  # a prefix plan without hits served nothing but a prefill
        ("dense", 16, 0, "dense"),
    ],
)
def test_the_mode_is_what_served_the_prompt_as_observed(planned, cached, reused, observed):
    stats = CallStats.of(engine_stats(cached, reused), ReuseStats(mode=planned), "smollm2", "w:1")
    assert stats.reuse_mode == observed
    assert (stats.cached_tokens, stats.reused_tokens, stats.recomputed_tokens) == (cached, reused, 50 - cached - reused)


def test_ttft_counts_planning_and_the_planners_record_is_copied_not_shared():
    engine = engine_stats(0, 0)
    engine.first_token_s = engine.arrival_s + 0.25
    reuse = ReuseStats(preprocess_s=0.5, segment_modes={"s": "dense"}, degradations=["KV store unavailable"])
    stats = CallStats.of(engine, reuse, "smollm2", "w:1")
    assert stats.ttft_s == pytest.approx(0.75) and stats.decode_tok_s == 0.0  # no finish yet: no decode rate
    reuse.segment_modes["s"], reuse.degradations[0] = "kvcomm", "changed"
    assert stats.segment_modes == {"s": "dense"} and stats.degradations == ("KV store unavailable",)
