"""`kvmesh bench fidelity-diff A.json B.json`: two fidelity runs over the same items, paired.

Two runs of `kvmesh bench fidelity` that differ in what serves them (the weight format, the model, the
device) answer the same items; this pairs their dense answers item by item: accuracy of each, B - A with a
95% bootstrap interval and McNemar's p, and how often the two replies are the same text. It is how a weight
format earns a place: it keeps the answers when B - A's interval sits around zero.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .bench_common import Json
from .json_report import save_json
from .paired_stats import mcnemar_exact_p, paired_bootstrap_ci


def _dense_results(path: Path) -> tuple[Json, dict[str, dict[str, Json]]]:
    """A run's model block and, per shape, its items' dense outcomes by item id."""
    try:
        run = json.loads(path.read_text())
        return run["model"], {
            shape: {item["id"]: item["modes"]["dense"] for item in task["item_results"]}
            for shape, task in run["tasks"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"kvmesh: error: {path} is not a `kvmesh bench fidelity --json` file with dense results ({exc})"
        ) from None


def _compare(a: list[Json], b: list[Json], seed: int) -> Json:
    right_a, right_b = [x["correct"] for x in a], [x["correct"] for x in b]
    low, high = paired_bootstrap_ci(right_b, right_a, seed=seed)
    return {
        "items": len(a),
        "accuracy_a": sum(right_a) / len(a),
        "accuracy_b": sum(right_b) / len(b),
        "delta": (sum(right_b) - sum(right_a)) / len(a),
        "delta_ci95": [low, high],
        "mcnemar_p": mcnemar_exact_p(right_b, right_a),
        "same_reply": sum(x["reply"] == y["reply"] for x, y in zip(a, b, strict=True)) / len(a),
    }


def diff_runs(path_a: Path, path_b: Path, seed: int = 0) -> Json:
    model_a, shapes_a = _dense_results(path_a)
    model_b, shapes_b = _dense_results(path_b)
    result: Json = {"a": {"file": str(path_a), **model_a}, "b": {"file": str(path_b), **model_b}, "shapes": {}}
    pooled_a, pooled_b = [], []
    for shape in sorted(set(shapes_a) & set(shapes_b)):
        ids = sorted(set(shapes_a[shape]) & set(shapes_b[shape]))
        a, b = [shapes_a[shape][i] for i in ids], [shapes_b[shape][i] for i in ids]
        if ids:
            result["shapes"][shape] = _compare(a, b, seed)
            pooled_a += a
            pooled_b += b
    if not pooled_a:
        raise SystemExit(f"kvmesh: error: {path_a} and {path_b} share no items; run both on the same split and seed")
    result["pooled"] = _compare(pooled_a, pooled_b, seed)
    return result


def _label(model: Json) -> str:
    return f"{model.get('name', '?')} {model.get('weights', '?')} on {model.get('device', '?')}"


def run_fidelity_diff(args: argparse.Namespace) -> int:
    result = diff_runs(Path(args.a), Path(args.b), seed=args.seed)
    print(f"A: {_label(result['a'])} ({args.a})\nB: {_label(result['b'])} ({args.b})")
    print(f"{'shape':<10} {'items':>5} {'A':>6} {'B':>6}  {'B - A [95% CI]':<24} {'McNemar p':>9} {'same reply':>10}")
    for shape, row in [*result["shapes"].items(), ("pooled", result["pooled"])]:
        low, high = row["delta_ci95"]
        print(f"{shape:<10} {row['items']:>5} {row['accuracy_a']:>6.1%} {row['accuracy_b']:>6.1%}  "
              f"{100 * row['delta']:+5.1f} [{100 * low:+5.1f}, {100 * high:+5.1f}]{'':<6} {row['mcnemar_p']:>9.3f} "
              f"{row['same_reply']:>10.0%}")  # fmt: skip
    save_json(args.json_path, result, print)
    return 0
