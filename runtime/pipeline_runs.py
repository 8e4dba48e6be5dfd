"""`kvmesh run` and `kvmesh demo`: load a pipeline file, run it with live progress, print the table."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from kvmesh.agents import Pipeline, PipelineError
from kvmesh.agents.errors import check_text

from .config import RuntimeConfig
from .progress import Progress, cell, result_table
from .results import PipelineResult


def load_pipeline(path: str) -> Pipeline:
    """Execute a pipeline file and return its `pipeline`; errors say what the file must define."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such file (a Python file that defines `pipeline = kvmesh.Pipeline(...)`)")
    try:
        namespace = runpy.run_path(str(file), run_name="__kvmesh_pipeline__")
    except PipelineError as exc:
        raise ValueError(f"{path}: the pipeline is not valid: {exc}") from exc
    except SyntaxError as exc:  # (in the file or in a module it imports): where, and what
        raise ValueError(f"{exc.filename}:{exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # the file raised: its line that did, not a traceback through runpy
        line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__)) if f.filename == str(file)), 0)
        raise ValueError(
            f"{path}:{line}: {type(exc).__name__}: {exc} (`python {path}` shows the whole traceback)"
        ) from None
    pipeline = namespace.get("pipeline")
    if not isinstance(pipeline, Pipeline):
        found = "nothing" if pipeline is None else f"a {type(pipeline).__name__}"
        raise ValueError(f"{path} must define `pipeline`, a kvmesh.Pipeline; it defines {found} by that name")
    return pipeline


def run_pipeline(pipeline: Pipeline, queries: Sequence[str], args: argparse.Namespace, demo: bool = False) -> int:
    """Run the pipeline once per query, in one session (so later runs find what earlier ones computed):
    live progress, then the outputs and the agents' table of the last run, and for several runs a line each
    with how much of the prompts the runs reused."""
    from .driver import Session

    for query in queries:
        check_text(query, "--query")  # now, not after the workers have started
    if args.max_tokens is not None:
        pipeline = pipeline.with_agent_options(max_tokens=args.max_tokens)
    config = session_config(args)
    started = time.perf_counter()
    print(f"kvmesh: starting {args.workers} worker(s) ({config.worker.model}) …", file=sys.stderr, flush=True)
    results: list[PipelineResult] = []
    with Session(workers=args.workers, address=args.address, config=config) as session:
        ready = time.perf_counter() - started
        where = "embedded local Ray" if session.cluster.embedded else f"Ray at {session.cluster.address}"
        print(
            f"kvmesh: {where}, ready in {ready:.1f} s, {session.worker_threads} thread(s) per worker; "
            f"running {pipeline.name!r}" + (f" on {len(queries)} questions" if len(queries) > 1 else ""),
            file=sys.stderr,
            flush=True,
        )
        progress = Progress(sys.stderr, show_tokens=args.tokens)
        for number, query in enumerate(queries, 1):
            if len(queries) > 1:
                print(f"kvmesh: run {number}/{len(queries)}: {query}", file=sys.stderr, flush=True)
            with session.ctrl_c_cancels():
                results.append(progress.follow(session.stream(pipeline, query, timeout_s=args.timeout)))
    for query, result in zip(queries[:-1], results[:-1], strict=False):
        last = _last_agent(result)
        print(f"\n{pipeline.name}: {query}\n── {last} ──\n{result.outputs[last].strip()}")
    _print_result(pipeline, queries[-1], results[-1], demo)
    if len(results) > 1:
        print("\n" + runs_table(queries, results))
    wall = sum(result.wall_s for result in results)
    print(f"\nstart-up {ready:.1f} s, runs {wall:.1f} s, total {time.perf_counter() - started:.1f} s")
    if args.json_path:
        runs = [result_json(pipeline, query, result) for query, result in zip(queries, results, strict=True)]
        Path(args.json_path).write_text(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2))
    return 0


def runs_table(queries: Sequence[str], results: Sequence[PipelineResult]) -> str:
    """A line per run: how much of its prompts came from the prefix cache and from other agents' KV, and
    its agents' mean TTFT, so reuse can be watched growing over the runs of one session."""
    header = f"{'run':>3}  {'question':<52} {'prompt':>6} {'cached':>7} {'reused':>7} {'TTFT s':>7} {'wall s':>6}"
    rows = [header, "-" * len(header)]
    for number, (query, result) in enumerate(zip(queries, results, strict=True), 1):
        calls = [r.stats for r in result.calls]
        prompt = sum(c.prompt_tokens for c in calls) or 1
        cached, reused = sum(c.cached_tokens for c in calls), sum(c.reused_tokens for c in calls)
        ttft = sum(c.ttft_s for c in calls) / max(len(calls), 1)
        rows.append(
            f"{number:>3}  {cell(query, 52):<52} {prompt:>6} {cached / prompt:>7.0%} {reused / prompt:>7.0%} "
            f"{ttft:>7.2f} {result.wall_s:>6.1f}"
        )
    return "\n".join(rows)


def _last_agent(result: PipelineResult) -> str:
    return list(result.outputs)[-1]


def session_config(args: argparse.Namespace) -> RuntimeConfig:
    """The environment's RuntimeConfig with the command line's worker settings on top (those it names)."""
    config = RuntimeConfig()
    given = {"model": args.model, "device": args.device, "weights": args.weights, "threads": args.threads}
    try:
        worker = replace(config.worker, **{name: value for name, value in given.items() if value is not None})
    except ValueError as exc:
        raise ValueError(f"--model/--device/--weights/--threads: {exc}") from None
    return replace(config, worker=worker)


def _print_result(pipeline: Pipeline, query: str, result: PipelineResult, demo: bool) -> None:
    print(f"\n{pipeline.name}: {query}\n")
    for name, text in result.outputs.items():
        print(f"── {name} ──\n{text.strip()}\n")
    print(result_table(result))
    calls = [r.stats for r in result.calls]
    cached = sum(c.cached_tokens for c in calls)
    reused = sum(c.reused_tokens for c in calls)
    prompt = sum(c.prompt_tokens for c in calls)
    kvcomm = sum(c.reuse_mode == "kvcomm" for c in calls)
    print(
        f"\nreuse: of {prompt} prompt tokens, {cached} ({cached / max(prompt, 1):.0%}) came from the exact prefix "
        f"cache and {reused} ({reused / max(prompt, 1):.0%}) from other agents' KV (KVCOMM, {kvcomm} of "
        f"{len(result.calls)} calls); auto reuses other agents' KV once audits of its dense calls show it keeps "
        "their answers (each call's segment_reasons say what held it back)"
    )


def result_json(pipeline: Pipeline, query: str, result: PipelineResult) -> dict:
    calls = [r.as_json() for r in result.calls]
    return {
        "pipeline": pipeline.name,
        "query": query,
        "run_id": result.run_id,
        "outputs": result.outputs,
        "rounds": result.rounds,
        "wall_s": result.wall_s,
        "calls": calls,
        "agents": {name: asdict(stats) for name, stats in result.stats.items()},
    }
