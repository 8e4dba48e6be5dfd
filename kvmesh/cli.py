"""The `kvmesh` command: runtime/cli.py's commands and bench/cli.py's `kvmesh bench` under one parser.

It lives in the package root, the one place that may import both: bench imports runtime, so runtime never
imports bench (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kvmesh.bench.cli import add_bench_commands
from kvmesh.runtime.cli import add_runtime_commands
from kvmesh.workers.model_config import UnsupportedModelError
from kvmesh.workers.model_files import ModelLoadError
from kvmesh.workers.sampling import InvalidRequestError

_terminated = threading.Event()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description="Multi-agent LLM pipelines with shared KV caches.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_runtime_commands(commands)
    add_bench_commands(commands)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM stops a command as Ctrl-C does: a run is cancelled, its session closed; then main exits 143.
    Raised as KeyboardInterrupt, the one exception Ray's blocking calls pass on as it is."""
    _terminated.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if _terminated.is_set():
            print("\nterminated (SIGTERM): the run was cancelled and its actors released", file=sys.stderr)
            return 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
        print("\ninterrupted: the run was cancelled and its actors released", file=sys.stderr)
        return 130
    except (ModelLoadError, UnsupportedModelError, InvalidRequestError, ValueError) as exc:  # these say what to do
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # e.g. no Ray cluster at --address
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a run that failed: the message names the agent or worker and the cause
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
