"""`kvmesh bench suffix` as a user runs it (a subprocess, the real model), and its workload files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmesh.bench.workload import Workload, WorkloadError, shipped_workloads


def test_shipped_workloads_load_and_keep_warmup_apart_from_the_measured_sessions():
    workloads = {w.name: w for w in map(Workload.load, shipped_workloads())}
    assert set(workloads) == {"self_refine", "pipeline", "control"}
    assert workloads["self_refine"].repetitive and not workloads["control"].repetitive
    stage = workloads["self_refine"].stages["revise"]
    assert "the draft {x}" in stage.render("x", "the draft {x}")  # outputs may hold braces


def test_a_bad_workload_file_is_named_with_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "name": "bad",
                "repetitive": True,
                "max_tokens": 8,
                "stages": {},
                "sessions": [{"input": "x", "chain": ["nope"]}],
            }
        )
    )
    with pytest.raises(WorkloadError, match=r"bad\.json.*unknown stages \['nope'\]"):
        Workload.load(path)


@pytest.mark.slow
def test_suffix_benchmark_quick_run_writes_the_promised_keys(tmp_path):
    out = tmp_path / "suffix.json"
    result = subprocess.run(
        [sys.executable, "-m", "kvmesh", "bench", "suffix", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    for name in ("self_refine", "pipeline", "control"):
        workload = report["workloads"][name]
        assert workload["identical"] is True, workload["divergences"]
        assert workload["speedup"] > 0 and workload["mean_accepted"] >= 0
        assert workload["warm"]["drafted"] >= workload["warm"]["accepted"]
    assert report["workloads"]["self_refine"]["warm"]["accepted"] > 0
    assert set(report["verify_cost"]["ms"]) == {"1", "5", "17"}
