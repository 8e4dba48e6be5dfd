"""A `kvmesh` CLI child process whose stderr is read as it comes, for tests that signal it mid-run."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliChild:
    process: subprocess.Popen[str]
    lines: list[str]
    started: threading.Event  # set at the first progress line of a round ("round 0: ...")
    reader: threading.Thread

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def start_cli(prelude: str, args: list[str], env: dict[str, str] | None = None) -> CliChild:
    """`python -c PRELUDE ARGS...` from the repository root; PRELUDE sets up signals, then runs kvmesh."""
    process = subprocess.Popen(
        [sys.executable, "-c", prelude, *args],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if line.startswith("round 0:"):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return CliChild(process, lines, started, reader)
