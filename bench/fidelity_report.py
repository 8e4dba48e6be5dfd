"""`kvmesh bench fidelity`'s figures from its item runs: per shape and mode, accuracy paired against dense
(difference, bootstrap 95% interval, exact McNemar p), how much of the prompts reuse served, TTFT, and how far
each reused prompt's next-token distribution sits from dense; per split the same accuracy figures; the table.

Token shares and fidelity cover the calls each mode served (not the first call, which runs once, densely,
for all modes). `reuse_mode` is what the planner served a call with; `segment_reasons` counts the planner's
per-segment reasons by producer, with numbers replaced by N so that alike reasons add up.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .fidelity_items import SPLITS, contains_answer
from .paired_stats import mcnemar_exact_p, paired_bootstrap_ci

if TYPE_CHECKING:
    from .fidelity_bench import CallRecord, ItemRun, ModeRun

Json = dict[str, Any]


def shape_report(runs: Sequence[ItemRun], modes: Sequence[str], resamples: int, seed: int) -> Json:
    report: Json = {"items": len(runs), "modes": {}, "splits": {}}
    shared = [run.shared for run in runs if run.shared is not None]
    if shared:
        report["first_call"] = {
            "agent": shared[0].agent,
            "answer_in_reply": sum(contains_answer(s.reply, r.item.answer) for s, r in zip(shared, runs, strict=True))
            / len(shared),
            "wall_s": statistics.mean(s.wall_s for s in shared),
        }
    dense_ttft = _mean([c.stats.ttft_s for run in runs for c in run.modes["dense"].calls])
    for mode in modes:
        calls = [c for run in runs for c in run.modes[mode].calls]
        row = _accuracy(runs, mode, resamples, seed) | _calls(calls)
        row["speedup_vs_dense"] = dense_ttft / row["ttft_s"] if dense_ttft and row["ttft_s"] else None
        row["wall_s"] = _mean([sum(c.wall_s for c in run.modes[mode].calls) for run in runs])
        row["segment_reasons"] = _reasons(calls)
        agents = dict.fromkeys(c.agent for c in calls)
        row["by_agent"] = {agent: _calls([c for c in calls if c.agent == agent]) for agent in agents}
        report["modes"][mode] = row
    for split in SPLITS:
        part = [run for run in runs if run.item.split == split]
        report["splits"][split] = {
            "items": len(part),
            "modes": {mode: _accuracy(part, mode, resamples, seed) for mode in modes},
        }
    report["item_results"] = [
        {
            "id": run.item.id,
            "split": run.item.split,
            "question": run.item.question,
            "answer": run.item.answer,
            "first_reply": run.shared.reply if run.shared is not None else None,
            "modes": {mode: _item_mode(r) for mode, r in run.modes.items()},
        }
        for run in runs
    ]
    return report


def _item_mode(run: ModeRun) -> Json:
    """One item in one mode: scored, and how far the scored call's reply start sat from dense (calibration)."""
    scored = run.calls[-1] if run.calls else None
    return {
        "correct": run.correct,
        "reply": run.reply,
        "kl": scored.kl if scored else None,
        "same_first_token": scored.same_first_token if scored else None,
        "reuse_mode": scored.reuse_mode if scored else None,
    }


def _accuracy(runs: Sequence[ItemRun], mode: str, resamples: int, seed: int) -> Json:
    """Accuracy and its paired difference from dense on the same items."""
    if not runs:
        return {"accuracy": None, "delta_vs_dense": None, "ci95": None, "mcnemar_p": None}
    system = [run.modes[mode].correct for run in runs]
    dense = [run.modes["dense"].correct for run in runs]
    low, high = paired_bootstrap_ci(system, dense, resamples, seed)
    return {
        "accuracy": sum(system) / len(runs),
        "delta_vs_dense": (sum(system) - sum(dense)) / len(runs),
        "ci95": [low, high],
        "mcnemar_p": mcnemar_exact_p(system, dense),
    }


def _calls(calls: Sequence[CallRecord]) -> Json:
    prompt = sum(c.stats.prompt_tokens for c in calls)
    return {
        "calls": len(calls),
        "reused_token_share": sum(c.stats.reused_tokens for c in calls) / prompt if prompt else None,
        "cached_token_share": sum(c.stats.cached_tokens for c in calls) / prompt if prompt else None,
        "ttft_s": _mean([c.stats.ttft_s for c in calls]),
        "first_token_agreement": sum(c.same_first_token for c in calls) / len(calls) if calls else None,
        "mean_kl": _mean([c.kl for c in calls]),
        "calls_by_reuse_mode": dict(Counter(c.reuse_mode for c in calls)),
    }


def _reasons(calls: Sequence[CallRecord]) -> dict[str, dict[str, int]]:
    """producer -> reason (numbers as N) -> segments given that reason."""
    counts: dict[str, Counter[str]] = {}
    for call in calls:
        for key, reason in call.stats.segment_reasons.items():
            producer = key.split(":", 1)[0]
            counts.setdefault(producer, Counter())[re.sub(r"\d+(\.\d+)?", "N", reason)] += 1
    return {producer: dict(found.most_common()) for producer, found in counts.items()}


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


# -- the table -------------------------------------------------------------------------------------
def print_report(results: Json) -> None:
    for shape, task in results["tasks"].items():
        splits = ", ".join(f"{task['splits'][s]['items']} {s}" for s in SPLITS)
        first = task.get("first_call")
        shared = (
            f"; {first['agent']} shared (dense), its reply holds the answer in {first['answer_in_reply']:.0%}"
            if first
            else ""
        )
        print(f"\n{shape}: {task['items']} items ({splits}){shared}")
        header = (
            "mode",
            "accuracy",
            "delta vs dense [95% CI]",
            "McNemar p",
            "reused",
            "cached",
            "TTFT s",
            "speedup",
            "1st token",
            "KL",
        )
        widths = (max(7, *map(len, task["modes"])), 8, 24, 9, 7, 7, 7, 7, 9, 7)
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
        for mode, row in task["modes"].items():
            cells = (
                mode,
                _pct(row["accuracy"]),
                _delta(row["delta_vs_dense"], row["ci95"]),
                _num(row["mcnemar_p"], ".3f"),
                _pct(row["reused_token_share"]),
                _pct(row["cached_token_share"]),
                _num(row["ttft_s"], ".3f"),
                _num(row["speedup_vs_dense"], ".2f") + "x",
                _pct(row["first_token_agreement"]),
                _num(row["mean_kl"], ".4f"),
            )
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        for split in SPLITS:
            if not task["splits"][split]["items"]:
                continue
            rows = task["splits"][split]["modes"]
            parts = [
                f"{mode} {_pct(r['accuracy'])} ({_delta(r['delta_vs_dense'], r['ci95'])})"
                for mode, r in rows.items()
                if mode != "dense"
            ]
            print(f"  {split}: dense {_pct(rows['dense']['accuracy'])}; " + "; ".join(parts))
        for mode, row in task["modes"].items():
            served = ", ".join(f"{name} {count}" for name, count in sorted(row["calls_by_reuse_mode"].items()))
            print(f"  {mode} calls served by: {served}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _delta(delta: float | None, ci: list[float] | None) -> str:
    if delta is None or ci is None:
        return "-"
    return f"{100 * delta:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
