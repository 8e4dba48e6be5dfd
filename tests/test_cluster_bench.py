"""`kvmesh bench cluster` without a cluster: its command line and the figures it derives."""

from __future__ import annotations

from kvmesh.bench.cluster_bench import _report
from kvmesh.cli import build_parser


def session(runs_per_min: float, busy: float, hits: float) -> dict:
    return {"runs_per_min": runs_per_min, "machine_busy_share": busy, "anchor_hit_rate": hits}


def test_the_report_has_the_promised_keys_and_bounds_scaling_by_the_idle_cpu():
    uses = {"worker-0": {"worker-0": 5}, "worker-1": {"worker-0": 7, "worker-1": 2}}
    report = _report({1: session(60, 0.8, 0.5), 2: session(66, 0.95, 0.6)}, uses, 8, 16, 2, 30.0, False)
    assert report["runs_per_min_1_worker"] == 60 and report["runs_per_min_2_workers"] == 66
    assert report["cross_worker_anchor_hits"] == 7 and report["cross_worker_anchor_hits_by_pair"] == {
        "worker-0->worker-1": 7
    }
    assert abs(report["scaling_ratio"] - 1.1) < 1e-9 and abs(report["scaling_bound_cpu"] - 1.25) < 1e-9
    idle = _report({1: session(60, 0.3, 0), 2: session(100, 0.6, 0)}, {}, 8, 16, 2, 30.0, False)
    assert idle["scaling_bound_cpu"] == 2.0  # never more than the second worker itself


def test_the_subcommand_parses():
    args = build_parser().parse_args(["bench", "cluster", "--quick", "--json", "out.json", "--concurrency", "3"])
    assert args.quick and args.json_path == "out.json" and args.concurrency == 3 and args.runs is None
