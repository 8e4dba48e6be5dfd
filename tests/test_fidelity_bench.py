"""`kvmesh bench fidelity`: its items, its statistics, its prompts against the runtime's, and a quick run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import pytest

from kvmesh.agents.render import render
from kvmesh.bench.fidelity_bench import FidelityBench, FidelityConfig, select_items, store_prefix
from kvmesh.bench.fidelity_frontier import frontier_rows
from kvmesh.bench.fidelity_items import SHAPES, ItemConfig, contains_answer, generate_items, normalize
from kvmesh.bench.fidelity_pipelines import shape_pipeline
from kvmesh.bench.fidelity_variants import SWEEP, Variant, variant
from kvmesh.bench.paired_stats import mcnemar_exact_p, paired_bootstrap_ci
from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.runtime.wire import generate_request
from kvmesh.runtime.worker_service import WorkerServicer
from kvmesh.workers.blend import BlendConfig
from kvmesh.workers.engine_loop import EngineLoop
from kvmesh.workers.worker import WorkerConfig, build_worker

ITEMS = generate_items()


# -- items -------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_items_and_another_seed_others():
    assert generate_items(ItemConfig(seed=0)) == ITEMS
    other = generate_items(ItemConfig(seed=1))
    assert [i.passage for i in other.items["relay"]] != [i.passage for i in ITEMS.items["relay"]]


def test_each_shape_has_at_least_150_items_split_in_two_disjoint_non_empty_halves():
    for shape in SHAPES:
        items = ITEMS.items[shape]
        assert len(items) >= 150
        tune = {i.id for i in items if i.split == "tune"}
        holdout = {i.id for i in items if i.split == "holdout"}
        assert tune and holdout and not tune & holdout and len(tune | holdout) == len(items)
        assert abs(len(tune) - len(holdout)) <= 1


def test_every_gold_answer_is_in_its_passage_and_not_given_away_by_its_question():
    for shape in SHAPES:
        for item in ITEMS.items[shape]:
            assert contains_answer(item.passage, item.answer), item
            assert not contains_answer(item.question, item.answer), item
    for item in ITEMS.items["retrieval"]:
        gold = [doc for doc in item.documents if contains_answer(ITEMS.documents[doc], item.answer)]
        assert item.passage in {ITEMS.documents[doc] for doc in gold}


def test_passages_are_new_in_every_item_and_about_a_hundred_words():
    for shape in ("relay", "critique"):
        passages = [item.passage for item in ITEMS.items[shape]]
        assert len(set(passages)) == len(passages)
        words = [len(p.split()) for p in passages]
        assert 70 <= sum(words) / len(words) <= 130
    questions = [item.question for shape in SHAPES for item in ITEMS.items[shape]]
    assert len(set(questions)) == len(questions)


def test_retrieval_documents_recur_across_questions_in_other_orders_and_places():
    seen: dict[str, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
    for item in ITEMS.items["retrieval"]:
        assert len(item.documents) == 4 and len(set(item.documents)) == 4
        for position, doc in enumerate(item.documents):
            seen[doc].append((position, item.documents))
    assert len(seen) == len(ITEMS.documents) <= 60
    assert all(len(uses) >= 3 for uses in seen.values())
    assert all(len({position for position, _ in uses}) >= 2 for uses in seen.values())
    assert all(len({order for _, order in uses}) == len(uses) for uses in seen.values())


def test_answers_match_as_whole_words_after_normalisation():
    assert normalize("The Tarrin, of course!") == "tarrin of course"
    assert contains_answer("About 4,310 people.", "4,310") and contains_answer("about 4310", "4,310")
    assert contains_answer("Captain Maren Oduya.", "Oduya")
    assert not contains_answer("It has 1200 bridges.", "12")
    assert not contains_answer("Oduyas", "Oduya")


def test_a_limit_with_both_splits_takes_items_from_each():
    chosen = select_items(ITEMS.items["relay"], None, 4)
    assert len(chosen) == 4 and {i.split for i in chosen} == {"tune", "holdout"}
    assert all(i.split == "holdout" for i in select_items(ITEMS.items["relay"], "holdout", 5))


# -- statistics --------------------------------------------------------------------------------------
def test_paired_bootstrap_interval_on_hand_made_outcomes():
    assert paired_bootstrap_ci([True] * 4, [False] * 4) == (1.0, 1.0)
    assert paired_bootstrap_ci([True, False, True], [True, False, True]) == (0.0, 0.0)
    # one item gained, one unchanged: resampled means are 0, 0.5 or 1, so the 95% interval is [0, 1]
    assert paired_bootstrap_ci([True, False], [False, False]) == (0.0, 1.0)
    assert paired_bootstrap_ci([False, True], [True, True], resamples=2000, seed=3) == (-1.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_ci([True], [True, False])


def test_exact_mcnemar_on_hand_made_outcomes():
    assert mcnemar_exact_p([True] * 3, [True] * 3) == 1.0
    # five disagreements, all against the system: 2 * (1/2)^5
    assert mcnemar_exact_p([False] * 5, [True] * 5) == pytest.approx(0.0625)
    # one for, four against: 2 * (1 + 5) / 32
    assert mcnemar_exact_p([True, False, False, False, False, True], [False, True, True, True, True, True]) == (
        pytest.approx(0.375)
    )


def test_a_config_without_dense_or_with_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="lack dense"):
        FidelityConfig(modes=("auto", "blend"))
    with pytest.raises(ValueError, match="'naive'"):
        FidelityConfig(modes=("dense", "naive"))
    assert FidelityConfig(modes=("blend", "dense")).modes == ("dense", "blend")
    with pytest.raises(ValueError, match="split 'test'"):
        FidelityConfig(split="test")


# -- the real path -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_bench_plans_token_for_token_what_the_worker_service_plans_for_the_same_call(model, tokenizer):
    """The runtime's own path: render, runtime/wire.py's GenerateRequest, the worker service's planning, on a
    worker reading the same Redis (as a second worker of a session would)."""
    item = select_items(ITEMS.items["relay"], None, 1)[0]
    settings = WorkerConfig(warm_up=False)
    with EmbeddedRedis() as redis:
        bench = FidelityBench(FidelityConfig(modes=("dense", "kvcomm")), settings, redis.url, model, tokenizer)
        run = bench.run_shape("relay", [item], ITEMS)[0]
        assert run.shared is not None
        for mode in ("dense", "kvcomm"):
            pipeline = shape_pipeline("relay", ITEMS).pipeline.with_agent_options(reuse=mode)
            reader, answerer = pipeline.agents["reader"], pipeline.agents["answerer"]
            calls = [(reader, {"query": item.question}, run.shared.prompt_ids)] if mode == "dense" else []
            calls.append(
                (answerer, {"query": item.question, "reader": run.shared.reply}, run.modes[mode].calls[0].prompt_ids)
            )
            worker = build_worker(
                settings, RedisStore(redis.url, prefix=store_prefix("relay", mode)), model=model, tokenizer=tokenizer
            )
            loop = EngineLoop(worker.engine)
            try:
                service = WorkerServicer(loop, worker.planner, "smollm2", lambda: "")
                for agent, values, bench_ids in calls:
                    request = generate_request(agent, render(agent, pipeline.tools, values), "t", pipeline.name, {})
                    assert service.plan(request)[1].token_ids == bench_ids, (mode, agent.name)
            finally:
                loop.close()
                worker.planner.close()


@pytest.mark.slow
def test_quick_run_writes_every_promised_key_for_every_shape_and_mode(tmp_path):
    out, plot = tmp_path / "fidelity.json", tmp_path / "frontier.png"
    command = ["bench", "fidelity", "--quick", "--limit", "2", "--json", str(out), "--plot", str(plot)]
    result = subprocess.run(
        [sys.executable, "-m", "kvmesh", *command], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"machine", "model", "elapsed_s", "tasks"} <= set(report)
    assert set(report["tasks"]) == set(SHAPES)
    keys = {
        "accuracy",
        "delta_vs_dense",
        "ci95",
        "mcnemar_p",
        "reused_token_share",
        "cached_token_share",
        "ttft_s",
        "wall_s",
        "first_token_agreement",
        "mean_kl",
        "calls_by_reuse_mode",
        "segment_reasons",
    }
    for shape, task in report["tasks"].items():
        assert task["items"] == 2 and len(task["item_results"]) == 2
        assert set(task["modes"]) == {"dense", "auto", "kvcomm", "blend"}
        for mode, row in task["modes"].items():
            assert keys <= set(row), (shape, mode)
            assert sum(row["calls_by_reuse_mode"].values()) == row["calls"] > 0
        dense = task["modes"]["dense"]
        assert dense["delta_vs_dense"] == 0 and dense["ci95"] == [0, 0] and dense["mcnemar_p"] == 1
        assert dense["first_token_agreement"] == 1 and dense["mean_kl"] == 0
        for split in ("tune", "holdout"):
            assert task["splits"][split]["items"] == 1
            assert set(task["splits"][split]["modes"]["blend"]) >= {"accuracy", "delta_vs_dense", "ci95"}
    assert "relay:" in result.stdout and "delta vs dense" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the frontier, drawn
    rows = frontier_rows(report)
    modes = ("dense", "auto", "kvcomm", "blend")
    assert {(row["shape"], row["variant"]) for row in rows} == {(shape, mode) for shape in SHAPES for mode in modes}


# -- variants: the methods the frontier puts side by side ------------------------------------------------
def test_variant_names_say_what_they_run():
    assert variant("auto") == Variant("auto", "auto")
    ref = variant("kvcomm_ref")
    assert ref.mode == "kvcomm" and ref.match is not None
    assert (ref.match.max_distance, ref.match.max_spread, ref.match.max_uncovered) == (math.inf, 0.0, 0.0)
    assert variant("kvcomm_d0.75").match == MatchConfig(max_distance=0.75)
    boundary = variant("blend_b16_15").blend
    assert boundary == BlendConfig(share=0.15, selection="boundary", boundary_tokens=16)
    assert variant("blend_q30").blend == BlendConfig(share=0.3, selection="question")
    combined = variant("kvcomm_any+blend_30")
    assert combined.mode == "kvcomm" and combined.kvcomm_repair == BlendConfig(share=0.3)
    settings = combined.worker(WorkerConfig(warm_up=False))
    assert settings.kvcomm_repair == BlendConfig(share=0.3) and settings.match.max_distance == math.inf
    for name in SWEEP:
        assert variant(name).name == name
    for bad in ("kvcomm_x", "blend_", "blend_q", "blend_30+kvcomm", "dense+blend_15"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant(bad)
