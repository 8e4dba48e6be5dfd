"""`kvmesh bench serve --quick` end to end: both ingresses' overheads and the blocks' keys, on a real session."""

from __future__ import annotations

import json

import pytest

from kvmesh.cli import build_parser

pytestmark = pytest.mark.slow


def test_quick_serve_bench_reports_blocks_and_both_ingresses_overhead(ray_cluster, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = build_parser().parse_args(["bench", "serve", "--quick", "--json", str(out)])
    assert args.handler(args) == 0
    report = json.loads(out.read_text())
    assert [(b["concurrency"], b["mode"]) for b in report["blocks"]] == [
        (1, "auto"),
        (1, "dense"),
        (2, "auto"),
        (2, "dense"),
    ]
    assert all(b["errors"] == 0 and b["calls"] == 3 * b["conversations"] for b in report["blocks"])
    assert all(b["empty_replies"] == 0 for b in report["blocks"])  # every call streamed text
    for key in ("overhead_c1", "overhead_c1_serve_ingress"):
        overhead = report[key]
        assert overhead["calls"] == 12  # 2 conversations × 3 agents × 2 modes
        assert 0 < overhead["worker_ttft_p50_ms"] < overhead["http_ttft_p50_ms"]
    fidelity = report["fidelity"]
    assert list(fidelity["shapes"]) == ["relay", "retrieval"] and fidelity["split"] == "holdout"
    for shape in fidelity["shapes"].values():
        assert shape["dense"]["server_reused_share"] == 0  # dense through the server reuses nothing
        for row in shape.values():
            assert row["items"] == 1 and 0 <= row["same_text"] <= 1
            assert row["server_minus_pipeline"] == row["server_accuracy"] - row["pipeline_accuracy"]
    printed = capsys.readouterr().out
    assert "uvicorn in the driver" in printed and "Ray Serve" in printed
    assert "fidelity tasks through the server" in printed
