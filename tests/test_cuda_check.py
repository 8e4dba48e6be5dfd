"""bench/cuda_check.py on the CPU with tiny models: the GPU slot it is written for is too short to debug it in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_model import random_llama_weights, tiny_config, tiny_vocab, write_tiny_gguf

from kvmesh.bench import cuda_check


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """One quick CPU run: a tiny GGUF (with a tokenizer, so numerics and Engine.step run) and the tiny shape."""
    tmp = tmp_path_factory.mktemp("cuda_check")
    config = tiny_config(vocab_size=len(tiny_vocab()[0]))
    model = write_tiny_gguf(tmp / "tiny.gguf", config, random_llama_weights(config, seed=0))
    out = tmp / "check.json"
    env = dict(os.environ, KVMESH_CACHE_DIR=str(tmp / "cache"), PYTHONWARNINGS="ignore::FutureWarning")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmesh.bench.cuda_check",
            "--device",
            "cpu",
            "--quick",
            "--shapes",
            "tiny",
            "--model",
            str(model),
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "sections ok" in done.stdout  # the summary
    return json.loads(out.read_text())


def test_every_section_ran(results):
    assert set(results["sections"]) == {
        "env",
        "floors",
        "numerics",
        "vs_transformers:tiny",
        "speed:model",
        "speed:tiny",
    }
    assert all(status["ok"] for status in results["sections"].values()), results["sections"]


def test_numerics_same_device_agrees_exactly(results):
    num = results["numerics"]
    fp32 = num["device_fp32"]
    for distance in fp32["logits_vs_cpu_fp32"].values():  # on the CPU "device fp32" is the reference itself
        assert distance["argmax_agreement"] == 1.0 and distance["max_abs_logit_diff"] <= 1e-5
    lengths = [len(tokens) for tokens in num["reference"]["tokens"]]
    assert len(lengths) == len(cuda_check.CHAT_PROMPTS) and min(lengths) >= 1
    assert all(1 >= first >= second >= 0 for first, second in num["reference"]["first_token_top2"])
    assert fp32["greedy"]["common_prefix"] == lengths and all(fp32["greedy"]["same_text"])
    bf16 = num["device_bf16"]  # CPUs without oneDNN bf16 skip it; with it, it must be close
    assert "skipped" in bf16 or min(d["argmax_agreement"] for d in bf16["logits_vs_cpu_fp32"].values()) > 0.5


def test_matches_transformers_in_fp32(results):
    entry = results["vs_transformers:tiny"]
    assert entry["logit_scale"] > 1.0  # O(1) logits: the tolerance below means something
    distance = entry["fp32"]["ours_vs_hf"]
    assert distance["max_abs_logit_diff"] <= 1e-4 and distance["argmax_agreement"] == 1.0
    assert "ours_vs_hf" in entry["bf16"] or "skipped" in entry["bf16"]


def test_speed_figures_are_positive(results):
    floors = results["floors"]
    assert min(floors[k] for k in ("matmul_gflops", "bandwidth_gbs", "read_gbs", "gemv_gbs")) > 0
    for shape in ("model", "tiny"):
        speed = results[f"speed:{shape}"]
        assert set(speed["prefill"]) == {str(n) for n in cuda_check.QUICK.prefill_lengths}
        assert all(e["ours_tok_s"] > 0 and e["hf_tok_s"] > 0 for e in speed["prefill"].values())
        assert speed["decode"]["ours_ms"] > 0 and speed["decode"]["hf_ms"] > 0 and speed["decode"]["floor_ms"] > 0
        assert speed["batch"]["ours_tok_s"] > 0 and speed["batch"]["hf_tok_s"] > 0
    assert results["speed:model"]["engine_batch"]["batch8_engine_tok_s"] > 0  # the file has a tokenizer
    assert "skipped" in results["speed:tiny"]["engine_batch"]


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, capsys):
    path = tmp_path / "r.json"
    args = cuda_check.build_parser().parse_args(["--device", "cpu", "--json", str(path)])
    check = cuda_check.Check(args, torch.device("cpu"), cuda_check.QUICK)
    check.run("broken", lambda: {"ratio": 1 / 0})
    check.run("fine", lambda: {"x": 1})
    saved = json.loads(path.read_text())  # written after each section, so a timeout keeps what was done
    assert not saved["sections"]["broken"]["ok"] and "ZeroDivisionError" in saved["sections"]["broken"]["error"]
    assert saved["sections"]["fine"]["ok"] and saved["fine"] == {"x": 1} and "broken" not in saved
    assert cuda_check.main(["--summarize", str(path)]) == 0
    assert "FAILED broken: ZeroDivisionError: division by zero" in capsys.readouterr().out
