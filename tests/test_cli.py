"""The `kvmesh` command as a user runs it: a subprocess, real model, real output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_child import start_cli

from kvmesh.bench.bench_common import ISA_FLAGS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def kvmesh(*args: str | bytes, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )


def test_generate_streams_a_chat_reply_and_reports_stats():
    result = kvmesh("generate", "What is the capital of France?", "--max-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "TTFT" in result.stderr and "finish: stop" in result.stderr


def test_generate_with_a_missing_model_says_what_to_give():
    result = kvmesh("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert result.returncode == 2
    assert "/nonexistent/model.gguf" in result.stderr and "HF model directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_with_bad_sampling_parameters_is_refused():
    result = kvmesh("generate", "hi", "--top-p", "0")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr


def test_engine_benchmark_quick_run_writes_the_promised_keys(tmp_path):
    out = tmp_path / "engine.json"
    result = kvmesh("bench", "engine", "--quick", "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["decode_ms_per_token"] and report["prefill_tok_s"]
    for context, blocks in report["decode_blocks"].items():  # measured until two blocks agreed, or 4 ran
        assert 2 <= blocks <= 4 and (report["decode_spread"][context] <= 0.05 or blocks == 4)
    assert report["batch8_tok_s"] > 0 and report["floor"]["decode_ms"] > 0
    assert report["floor"]["matmul_gflops"] > 0 and report["floor"]["bandwidth_gbs"] > 0
    assert "vs_transformers" in report
    spread = report["spread"]  # every repeated figure's spread, and the worst one as a target
    assert {f"prefill_tok_s@{n}" for n in report["prefill_tok_s"]} <= set(spread["figures"])
    assert {f"decode_ms@{c}" for c in report["decode_ms_per_token"]} <= set(spread["figures"])
    assert spread["max"] == max(spread["figures"].values()) == spread["figures"][spread["worst"]]
    assert report["targets"]["spread"]["value"] == spread["max"]
    decode_vs_floor = report["targets"]["decode_vs_floor"]["value"]
    main = min(report["decode_ms_per_token"], key=int)  # --quick states its targets at its one context
    assert decode_vs_floor == pytest.approx(report["decode_ms_per_token"][main] / report["floor"]["decode_ms"])
    assert report["targets"]["prefill_vs_transformers"]["pass"] is None  # --quick skips transformers
    kernels = report["model"]["kernels"]  # which implementation each linear took
    # SmolLM2's 30 layers' four linears and the LM head (prefill), and the decode step's graph
    assert kernels.pop("StepGraph") == 1 and sum(kernels.values()) == 4 * 30 + 1
    assert all(f"{count} {name}" in result.stdout for name, count in kernels.items())
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert report["machine"]["isa"] == [flag for flag in ISA_FLAGS if flag in flags]


def test_fanout_benchmark_quick_run_shares_the_prefix_and_keeps_the_tokens(tmp_path):
    out = tmp_path / "fanout.json"
    result = kvmesh("bench", "fanout", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    agents, prefix = report["agents"], report["shared_prefix_tokens"]
    assert (agents, prefix, report["decode_tokens"]) == (3, 256, 8)
    for variant in ("copied", "shared"):
        assert report["prefix_hit_tokens"][variant] == [prefix] * agents  # every agent really hit the prefix
        assert report["decode_steps"][variant] >= 1  # steps of all agents decoding and nothing else
        assert report["decode_step_ms"][variant] > 0 and report["prefix_hit_ms"][variant] > 0
        assert report["floor_step_ms"][variant] > 0
    assert report["identical"] is True and report["identical_agents"] == agents  # sharing changes no token
    kv = report["kv_bytes"]
    saved = (agents - 1) * prefix * report["floor"]["kv_bytes_per_token"]  # the copies sharing does not make
    assert kv["copied"] - kv["shared"] == pytest.approx(saved, rel=0.05)
    assert report["floor_step_ms"]["shared"] < report["floor_step_ms"]["copied"]
    assert report["speedup"] == pytest.approx(report["decode_step_ms"]["copied"] / report["decode_step_ms"]["shared"])
    assert set(report["targets"]) == {"speedup", "kv_ratio", "identical", "prefix_hit_ms"}
    assert report["targets"]["identical"]["pass"] is True
    assert "floor ms" in result.stdout and "targets:" in result.stdout
    cold = report["cold"]  # nothing cached: copied, every agent computes the context; shared, the first one
    assert cold["copied"]["prompt_tokens_computed"] == sum(report["prompt_tokens"])
    assert cold["copied"]["prompt_tokens_computed"] - cold["shared"]["prompt_tokens_computed"] >= (agents - 1) * prefix
    assert report["cold_identical"] is True and cold["shared"]["wall_s"] > 0


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import kvmesh\npipeline = (\n", ":2: '(' was never closed"),
        ("import kvmesh\n\npipeline = kvmesh.Pipeline('p', [kvmesh.Agent('a')], rounds=nope)\n", ":3: NameError:"),
    ],
)
def test_a_pipeline_file_that_does_not_run_is_reported_in_one_line(tmp_path, source, expected):
    path = tmp_path / "broken.py"
    path.write_text(source)
    result = kvmesh("run", str(path), "--query", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"kvmesh: error: {path}{expected}")


def test_a_query_that_is_not_valid_unicode_is_refused_before_anything_starts():
    # undecodable bytes on the command line arrive as lone surrogates (surrogateescape)
    result = kvmesh("run", "examples/debate.py", "--query", b"caf\xe9 or tea?")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--query is not valid Unicode: a lone surrogate U+DCE9 at character 3" in result.stderr
    assert "starting" not in result.stderr  # refused before Ray or a worker was started


# The child gets SIGTERM as `kill` or Kubernetes would give it: not blocked (a signal mask is inherited through
# fork and exec, and this process's threads may block signals).
_UNBLOCKED = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}); "
    "sys.argv[0] = 'kvmesh'; runpy.run_module('kvmesh', run_name='__main__')"
)


def test_sigterm_cancels_the_run_closes_the_session_and_exits_143():
    args = ["run", "examples/debate.py", "--query", "Is tea better than coffee?"]
    child = start_cli(_UNBLOCKED, args, env=os.environ | {"RAY_ADDRESS": ""})  # its own embedded Ray
    process, lines, started, reader = child.process, child.lines, child.started, child.reader
    assert started.wait(180), "".join(lines)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(90)
    finally:
        process.kill()
    reader.join(10)
    stderr = "".join(lines)
    assert code == 143, stderr
    assert "terminated (SIGTERM): the run was cancelled and its actors released" in stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr  # no Ray C++ stack dump, no traceback
    assert process.stdout is not None and "TTFT s" not in process.stdout.read()  # cancelled: no result table
