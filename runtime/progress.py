"""Showing a run to a person: live progress while it streams, and the final table of agents.

On a terminal, one status line is redrawn in place (which agents run, how many tokens each has);
elsewhere (pipes, CI logs) a line is printed per phase and per finished agent. With show_tokens, the
text itself streams, labelled by agent whenever the speaker changes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from .events import AgentFinished, PhaseStarted, Retried, RunFinished, StreamEvent, Token
from .results import PipelineResult


class Progress:
    def __init__(self, out: TextIO = sys.stderr, tty: bool | None = None, show_tokens: bool = False) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.show_tokens = show_tokens
        self._phase = ""
        self._tokens: dict[str, int] = {}
        self._done: set[str] = set()
        self._speaker = ""
        self._degradations: set[str] = set()  # each said once per run shown

    def follow(self, events: Iterable[StreamEvent]) -> PipelineResult:
        """Consume a run's events, showing them; returns the result."""
        try:
            for event in events:
                self.show(event)
                if isinstance(event, RunFinished):
                    return event.result
        except BaseException:
            if self.tty or self._speaker:  # end the status line or the streamed text before the error
                self.out.write("\n")
            raise
        raise RuntimeError("the run ended without a result")

    def show(self, event: StreamEvent) -> None:
        if isinstance(event, PhaseStarted):
            self._phase = str(event.phase)
            self._tokens = dict.fromkeys(event.agents, 0)
            self._done = set()
            if not self.tty and not self.show_tokens:
                self._line(f"{self._phase}: {', '.join(event.agents)}")
        elif isinstance(event, Token):
            self._tokens[event.agent] = self._tokens.get(event.agent, 0) + 1
            if self.show_tokens:
                if event.agent != self._speaker:
                    self.out.write(f"\n[{event.agent}] ")
                    self._speaker = event.agent
                self.out.write(event.text)
                self.out.flush()
        elif isinstance(event, Retried):
            self._tokens[event.agent] = 0
            self._line(f"  ↻ {event.agent}: {event.reason}")
        elif isinstance(event, AgentFinished):
            self._done.add(event.agent)
            r = event.record.stats
            for degradation in r.degradations:
                if degradation not in self._degradations:
                    self._degradations.add(degradation)
                    self._line(f"  ! {event.agent}: {degradation}")
            if not self.tty or self.show_tokens:
                self._line(
                    f"  ✓ {event.agent} ({event.phase}): {r.output_tokens} tokens, TTFT {r.ttft_s:.2f} s, "
                    f"{r.decode_tok_s:.1f} tok/s, {r.cached_tokens}/{r.prompt_tokens} prompt tokens cached"
                )
                self._speaker = ""
        elif isinstance(event, RunFinished) and self.tty and not self.show_tokens:
            self.out.write("\r\033[K")
            self.out.flush()
        if self.tty and not self.show_tokens and isinstance(event, PhaseStarted | Token | AgentFinished):
            self._status()

    def _status(self) -> None:
        parts = []
        for agent, count in self._tokens.items():
            mark = "✓" if agent in self._done else "▸" if count else "…"
            parts.append(f"{mark} {agent} {count}")
        self.out.write("\r\033[K" + f"{self._phase} │ " + " │ ".join(parts))
        self.out.flush()

    def _line(self, text: str) -> None:
        prefix = "\r\033[K" if self.tty and not self.show_tokens else ("\n" if self._speaker else "")
        self.out.write(prefix + text + "\n")
        self.out.flush()


def cell(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def result_table(result: PipelineResult, output_width: int = 52) -> str:
    """Agent | output (truncated) | TTFT | tok/s | prompt | cached | reused | calls | wall — a row per agent."""
    header = f"{'agent':<14} {'output':<{output_width}} {'TTFT s':>7} {'tok/s':>6} {'prompt':>6} {'cached':>6} "
    header += f"{'reused':>6} {'calls':>5} {'wall s':>6}"
    rows = [header, "-" * len(header)]
    for name, stats in result.stats.items():
        text = next((h[name] for h in reversed(result.history) if name in h), "")
        rows.append(
            f"{cell(name, 14):<14} {cell(text, output_width):<{output_width}} {stats.ttft_s:>7.2f} "
            f"{stats.decode_tok_s:>6.1f} {stats.prompt_tokens:>6} {stats.cached_tokens:>6} {stats.reused_tokens:>6} "
            f"{stats.calls:>5} "
            f"{stats.wall_s:>6.2f}"
        )
    return "\n".join(rows)
