"""llama.cpp beside kvmesh in `kvmesh bench engine`: the skip note without llama-cpp-python, the rounds' and
speedups' arithmetic, and the real measurement at tiny sizes when llama-cpp-python is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvmesh.bench import engine_bench, llama_cpp_engine
from kvmesh.bench.llama_cpp_server import missing_note
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_files import resolve_model_path

TINY = llama_cpp_engine.Sizes(prefill_lengths=(8, 16), decode_contexts=(16,), decode_tokens=2, rounds=2)


def _never(ids: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
    raise AssertionError("a skipped section measures nothing")


def _hide_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name.split(".")[0] == "llama_cpp" else real(name, *args),
    )


def test_without_llama_cpp_the_section_is_skipped_saying_how_to_get_it(monkeypatch, tmp_path):
    _hide_llama_cpp(monkeypatch)
    result = llama_cpp_engine.bench_llamacpp(tmp_path / "model.gguf", 2, TINY, 256, _never)
    assert set(result) == {"skipped"}
    note = result["skipped"]
    assert "`pip install llama-cpp-python`" in note and "11 minutes" in note
    assert "[server]" in missing_note()  # the serve bench's column still asks for the server extra

    vs = llama_cpp_engine.speedups(result, 16)
    assert vs == {"skipped": note}
    assert engine_bench._llamacpp_rows(result, vs, "fp32") == [("vs llama.cpp", "-", note, "")]
    results = {
        "decode_ms_per_token": {"128": 40.0},
        "prefill_efficiency": {"128": 0.5},
        "batch_context": 128,
        "batch8_speedup": 3.0,
        "vs_transformers": {"skipped": "--quick"},
        "vs_llamacpp": vs,
        "floor": {"decode_ms": 10.0},
        "model": {"weight_format": "fp32"},
    }
    results["spread"] = engine_bench.collect_spreads(results)
    target = engine_bench.evaluate_targets(results, engine_bench.QUICK)["decode_vs_llamacpp"]
    assert target["pass"] is None and target["note"] == note


def test_a_model_that_is_no_gguf_file_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(llama_cpp_engine, "missing_note", lambda **_: None)  # as if llama-cpp-python were here
    result = llama_cpp_engine.bench_llamacpp(tmp_path, 2, TINY, 256, _never)
    assert "GGUF only" in result["skipped"]


def test_rounds_alternate_the_first_engine_and_speedups_say_how_many_times_faster_kvmesh_is():
    calls: list[tuple[str, int, int]] = []

    def engine(name: str, seconds_per_token: float, decode_ms: float) -> llama_cpp_engine.Measure:
        def measure(ids: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
            calls.append((name, ids.numel(), decode_tokens))
            return seconds_per_token * ids.numel(), decode_ms if decode_tokens else None

        return measure

    # llama.cpp: 1 ms per prompt token, 10 ms per decode token; ours twice as fast at both
    found = llama_cpp_engine.interleaved_rounds(
        {"llama_cpp": engine("llama_cpp", 1e-3, 10.0), "ours": engine("ours", 5e-4, 5.0)}, TINY, vocab=256
    )
    assert calls[:2] == [("llama_cpp", 8, 0), ("ours", 8, 0)]
    assert calls[4:6] == [("ours", 8, 0), ("llama_cpp", 8, 0)]  # round 2 starts with the other engine
    assert ("ours", 16, 2) in calls and len(calls) == 2 * 2 * 2  # 2 engines x 2 lengths x 2 rounds
    assert found["llama_cpp"]["prefill_tok_s"] == pytest.approx({"8": 1000.0, "16": 1000.0})
    assert found["llama_cpp"]["decode_ms_per_token"] == {"16": 10.0} and found["ours"]["decode_spread"] == {"16": 0.0}

    vs = llama_cpp_engine.speedups({**found["llama_cpp"], "ours": found["ours"]}, 16)
    assert vs["decode_speedup"] == pytest.approx(2.0) and vs["prefill_speedup"] == pytest.approx(2.0)
    assert vs["prefill_speedup_by_length"] == pytest.approx({"8": 2.0, "16": 2.0})
    assert "> 1: kvmesh faster" in vs["definitions"]["decode_speedup"]
    assert engine_bench._times_faster(2.0) == "2.00x, kvmesh faster"
    assert engine_bench._times_faster(0.25) == "0.25x, llama.cpp 4.0x faster"


@pytest.mark.slow
def test_llama_cpp_beside_kvmesh_at_tiny_sizes(request: pytest.FixtureRequest):
    pytest.importorskip("llama_cpp")  # an optional comparison column, not a product path
    model: LlamaModel = request.getfixturevalue("model")  # loaded only when llama.cpp is there to compare with
    result = llama_cpp_engine.bench_llamacpp(
        resolve_model_path(), torch.get_num_threads(), TINY, model.config.vocab_size, engine_bench._ours_measure(model)
    )
    assert "skipped" not in result, result
    assert result["version"] and result["weights"] == "Q4_1" and "Q4_1" in result["note"]
    assert result["settings"]["n_threads"] == torch.get_num_threads()
    for side in (result, result["ours"]):
        assert set(side["prefill_tok_s"]) == {"8", "16"} and set(side["decode_ms_per_token"]) == {"16"}
        assert all(v > 0 for v in [*side["prefill_tok_s"].values(), *side["decode_ms_per_token"].values()])
        assert all(v >= 0 for v in [*side["prefill_spread"].values(), *side["decode_spread"].values()])
    vs = llama_cpp_engine.speedups(result, 16)
    assert vs["decode_speedup"] > 0 and vs["prefill_speedup"] > 0
    rows = engine_bench._llamacpp_rows(result, vs, "fp32")
    assert [row[0] for row in rows] == [
        "vs llama.cpp prefill 8 tok/s",
        "vs llama.cpp prefill 16 tok/s",
        "vs llama.cpp decode @16 ms/token",
        "  weights",
    ]
