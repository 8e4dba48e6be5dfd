"""The `kvmesh` command as a user runs it: a subprocess, real model, real output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def kvmesh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", *args], capture_output=True, text=True, timeout=timeout, check=False
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
    assert report["batch8_tok_s"] > 0 and report["floor"]["decode_ms"] > 0
    assert report["floor"]["matmul_gflops"] > 0 and report["floor"]["bandwidth_gbs"] > 0
    assert "vs_transformers" in report
