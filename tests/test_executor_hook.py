"""Pipeline.run/stream go to the registered executor; agents/ itself knows no runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmesh import Agent, Pipeline, self_refine
from kvmesh.agents import executor


def test_without_an_executor_run_says_what_to_do():
    saved = executor._factory
    executor.set_executor(None)
    try:
        with pytest.raises(RuntimeError, match=r"import kvmesh.*run_locally"):
            Pipeline("p", [Agent("a")]).run("hi")
    finally:
        executor.set_executor(saved)


def test_the_executor_gets_the_pipeline_the_query_and_the_options():
    calls = []

    class Recorder:
        def run(self, pipeline, query, **options):
            calls.append(("run", pipeline.name, query, options))
            return "result"

        def stream(self, pipeline, query, **options):
            calls.append(("stream", pipeline.name, query, options))
            return iter(["event"])

    saved = executor._factory
    executor.set_executor(Recorder)
    try:
        pipeline = Pipeline("p", [Agent("a")])
        assert pipeline.run("hi", timeout_s=3) == "result"
        assert list(pipeline.stream("yo")) == ["event"]
    finally:
        executor.set_executor(saved)
    assert calls == [("run", "p", "hi", {"timeout_s": 3}), ("stream", "p", "yo", {})]


def test_with_agent_options_changes_every_agent_and_keeps_the_loop():
    pipeline = self_refine("r", ("w", "Write."), ("c", "Critique."), until=lambda o: True, max_iters=3)
    quick = pipeline.with_agent_options(max_tokens=5)
    assert {a.max_tokens for a in quick.agents.values()} == {5}
    assert quick.until is pipeline.until and quick.rounds == 3 and quick.outputs == ("w",)


def test_importing_kvmesh_loads_neither_ray_nor_grpc_nor_torch():
    code = "import sys, kvmesh; print(sorted(m for m in ('ray', 'grpc', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
