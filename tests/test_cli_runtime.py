"""`kvmesh run` and `kvmesh demo` as a user runs them: subprocesses, real Ray, real model, real output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from cli_child import start_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def kvmesh(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env=os.environ | env,
    )


def test_run_a_pipeline_file_on_an_existing_cluster_with_progress_and_json(ray_cluster, tmp_path):
    out = tmp_path / "run.json"
    result = kvmesh(
        "run", "examples/rag_answerer.py", "--query", "How tall is the Eiffel Tower?", "--max-tokens", "8",
        "--address", ray_cluster.address, "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Ray at {ray_cluster.address}" in result.stderr
    assert "✓ answerer (round 0)" in result.stderr and "✓ checker (round 0)" in result.stderr
    assert "TTFT s" in result.stdout and "cached" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["outputs"]) == {"checker"} and report["outputs"]["checker"]
    assert [c["agent"] for c in report["calls"]] == ["answerer", "checker"]
    assert all(0 < c["output_tokens"] <= 8 and c["ttft_s"] > 0 for c in report["calls"])


def test_demo_runs_three_questions_in_one_session_and_shows_reuse_growing(tmp_path):
    out = tmp_path / "demo.json"
    env = {"KVMESH_DEMO_MAX_TOKENS": "8", "RAY_ADDRESS": ""}  # its own embedded cluster
    result = kvmesh("demo", "--json", str(out), **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded local Ray" in result.stderr and "run 3/3" in result.stderr
    table = result.stdout[result.stdout.index("TTFT s") :]
    for agent in ("planner", "advocate", "critic", "judge"):
        assert agent in table
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 3
    for run in runs:
        assert all(0 < c["output_tokens"] <= 8 for c in run["calls"])
    share = [
        sum(c["cached_tokens"] for c in run["calls"]) / sum(c["prompt_tokens"] for c in run["calls"]) for run in runs
    ]
    first = {c["agent"]: c for c in runs[0]["calls"]}
    # run 1: the planner computes the brief and question, the others find them; from run 2 on, the brief
    # itself is in the prefix cache for every agent: the cached share grows
    assert first["planner"]["cached_tokens"] < first["judge"]["cached_tokens"]
    assert share[1] > share[0] and share[2] > share[0], share
    later = {c["agent"]: c for c in runs[1]["calls"]}
    assert later["planner"]["cached_tokens"] > first["planner"]["cached_tokens"] + 100  # the brief, now cached
    assert "cached" in result.stdout and "prefix cache" in result.stdout


def test_a_bad_pipeline_file_is_refused_with_what_it_must_define(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = kvmesh("run", str(empty), "--query", "hi")
    assert result.returncode == 2 and "must define `pipeline`" in result.stderr and "Traceback" not in result.stderr
    missing = kvmesh("run", "nope.py", "--query", "hi")
    assert missing.returncode == 2 and "no such file" in missing.stderr


# The child gets SIGINT as a terminal would give it: default action, not blocked. (A signal mask is
# inherited through fork and exec, and the threads of this process — Ray's, gRPC's — may block signals.)
_AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'kvmesh'; "
    "runpy.run_module('kvmesh', run_name='__main__')"
)


def _signal_state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return " ".join(line.strip() for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_ctrl_c_cancels_the_run_and_releases_its_actors(ray_cluster):
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    args = ["run", "examples/debate.py", "--query", "Is tea better than coffee?", "--address", ray_cluster.address]
    child = start_cli(_AS_FROM_A_TERMINAL, args)
    process, lines, started = child.process, child.lines, child.started
    assert started.wait(120), "".join(lines)
    time.sleep(0.5)  # the debaters are generating now
    during = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} - before
    assert any(name.endswith("-pro") for name in during), during
    signals = _signal_state(process.pid)
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130, f"{signals}\n" + "".join(lines)
    time.sleep(0.5)
    assert "interrupted: the run was cancelled" in "".join(lines)
    after = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not (after - before), f"actors left behind: {after - before}"


def test_runtime_benchmark_quick_run_writes_the_promised_keys(ray_cluster, tmp_path):
    out = tmp_path / "runtime.json"
    result = kvmesh("bench", "runtime", "--quick", "--address", ray_cluster.address, "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("grpc_p50_ms", "grpc_p99_ms", "ray_call_p50_ms", "overhead_share", "overhead_share_long"):
        assert isinstance(report[key], float), key
    assert 0 < report["grpc_p50_ms"] <= report["grpc_p99_ms"] and report["floor"]["grpc_bare_p50_ms"] > 0
    assert 0 < report["overhead_share"] < 1 and report["chain_1"]["median"]["output_tokens"] == [1] * 10
    trace = report["breakdown"]["1"]  # the critical path read off the run's spans
    assert len(trace["chat_ms"]) == 10 and len(trace["hops_ms"]) == 9 and trace["totals_ms"]["model"] > 0
    assert "gRPC Deliver (agent)" in result.stdout and "target grpc_p50_ms" in result.stdout


OUTAGE = """
import os, signal
from kvmesh import Agent, Pipeline, tool

@tool
def outage(query: str) -> str:
    os.kill({pid}, signal.SIGKILL)  # the session's Redis goes away mid-run
    return "Noted."

pipeline = Pipeline("outage", [
    Agent("first", "{{outage}} Say one word about {{query}}.", max_tokens=4),
    Agent("second", "Repeat this: {{first}}", max_tokens=4),
], tools=[outage])
"""


def test_a_store_lost_mid_run_is_said_once_and_the_run_completes(ray_cluster, tmp_path):
    from kvmesh.kvcomm.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as redis:
        file = tmp_path / "outage.py"
        file.write_text(OUTAGE.format(pid=redis.pid))
        result = kvmesh(
            "run", str(file), "--query", "tea", "--address", ray_cluster.address, KVMESH_REDIS_URL=redis.url
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "✓ first" in result.stderr and "✓ second" in result.stderr
    said = [line for line in result.stderr.splitlines() if "KV store unavailable" in line]
    assert len(said) == 1 and said[0].lstrip().startswith("! first:"), result.stderr[-3000:]
    assert redis.url not in result.stderr  # the password stays out of the output
