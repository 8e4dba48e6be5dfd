"""How a run is shown to a person: progress lines (pipes), a redrawn status line (terminals), the table."""

from __future__ import annotations

import io
from dataclasses import replace

from kvmesh.agents import Phase
from kvmesh.runtime.events import AgentFinished, PhaseStarted, RunFinished, Token
from kvmesh.runtime.progress import Progress, result_table
from kvmesh.runtime.results import CallRecord, PipelineResult
from kvmesh.workers.worker import CallStats

ROUND0 = Phase(0)


def record(agent: str, tokens: int, cached: int) -> CallRecord:
    stats = CallStats(40, cached, output_tokens=tokens, ttft_s=0.25, decode_tok_s=30.0, reuse_mode="prefix")
    return CallRecord(agent, ROUND0, replace(stats, model="smollm2", worker="127.0.0.1:1"), wall_s=0.5)


def run_events() -> list:
    result = PipelineResult(
        outputs={"b": "two\nlines"},
        history=[{"a": "x" * 80, "b": "two\nlines"}],
        rounds=1,
        calls=[record("a", 3, 0), record("b", 2, 32)],
    )
    return [
        PhaseStarted(ROUND0, ("a", "b")),
        Token("a", ROUND0, "Hel"),
        Token("a", ROUND0, "lo"),
        AgentFinished("a", ROUND0, "Hello", result.calls[0]),
        Token("b", ROUND0, "Hi"),
        AgentFinished("b", ROUND0, "Hi", result.calls[1]),
        RunFinished(result),
    ]


def test_in_a_pipe_each_phase_and_finished_agent_gets_a_line():
    out = io.StringIO()
    result = Progress(out, tty=False).follow(run_events())
    assert result.outputs == {"b": "two\nlines"}
    assert out.getvalue().splitlines() == [
        "round 0: a, b",
        "  ✓ a (round 0): 3 tokens, TTFT 0.25 s, 30.0 tok/s, 0/40 prompt tokens cached",
        "  ✓ b (round 0): 2 tokens, TTFT 0.25 s, 30.0 tok/s, 32/40 prompt tokens cached",
    ]


def test_on_a_terminal_one_status_line_is_redrawn():
    out = io.StringIO()
    Progress(out, tty=True).follow(run_events())
    frames = out.getvalue().split("\r\033[K")
    assert "round 0 │ ▸ a 2 │ … b 0" in frames and "round 0 │ ✓ a 2 │ ✓ b 1" in frames
    assert "\n" not in out.getvalue()


def test_with_tokens_the_text_streams_labelled_by_agent():
    out = io.StringIO()
    Progress(out, tty=False, show_tokens=True).follow(run_events())
    assert "[a] Hello\n  ✓ a (round 0)" in out.getvalue() and "[b] Hi\n  ✓ b" in out.getvalue()


def test_the_table_has_a_row_per_agent_with_its_figures():
    table = result_table(run_events()[-1].result, output_width=20).splitlines()
    header = ["agent", "output", "TTFT", "s", "tok/s", "prompt", "cached", "reused", "calls", "wall", "s"]
    assert table[0].split() == header
    assert table[2].split()[:2] == ["a", "x" * 19 + "…"]
    assert table[3].split() == ["b", "two", "lines", "0.25", "30.0", "40", "32", "0", "1", "0.50"]
