"""`kvmesh bench serve`: a multi-agent app through `kvmesh serve`'s OpenAI API, at 1, 8 and 32 conversations at once.

The app is the one a LangGraph user writes (tests/test_openai_serve.py runs it through LangGraph itself): three
agents, each a streamed chat completion with its own system prompt — a researcher lists the facts of a
passage, a writer summarizes it from the researcher's notes (quoted in its message), a reviewer checks the
writer's draft (quoted) — all three reading the passage as a message of its own. Every conversation reads a
passage of its own, so the exact prefix cache serves an agent's system prompt and no more: the rest is
cross-agent reuse or prefill. The client is plain HTTP (bench/openai_client.py), greedy, and knows nothing of
kvmesh but the reuse-off switch.

Per block (concurrency × reuse mode): TTFT p50/p99 as the client sees it (request sent -> first text), output
tokens/s (all the block's completion tokens / its wall time), the shares of prompt tokens served by the prefix
cache and by reused segment KV, and errors. Modes: `auto` (the server's default: what a client gets) and
`dense` (the `kvmesh` extension's `{"reuse": "dense"}`: no reuse at all). Before them, unmeasured, a few
conversations run under auto, so the agents' templates have anchors and audited calls, as on a server that
has been up a while.

Overhead: at concurrency 1, per call, TTFT through HTTP minus the TTFT the worker reports for the same call
(`kvmesh.ttft_s`: from its arrival at the worker, planning included) is what HTTP, the ingress, routing and the
gRPC hop add; target: at most 5% of TTFT (p50). The blocks run through the default ingress (uvicorn in the
driver); the concurrency-1 block runs again through a Ray Serve ingress on the same workers, for its overhead.

Beside it, llama-cpp-python's OpenAI server on the same GGUF, the same app and levels, when it is installed
(its column is skipped with a note otherwise: it compiles llama.cpp on install).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .fidelity_items import SHAPES
from .json_report import save_json
from .llama_cpp_server import MODEL_ALIAS, llama_cpp_server, missing_note
from .openai_client import StreamedCall, stream_chat
from .serve_fidelity import bench_serve_fidelity, print_serve_fidelity

Json = dict[str, Any]
TARGET_OVERHEAD_SHARE = 0.05  # HTTP + routing, of TTFT at concurrency 1
SYSTEMS = {
    "researcher": "You are a researcher. List the key facts of the passage.",
    "writer": "You are a writer. Write one clear paragraph.",
    "reviewer": "You are a strict reviewer.",
}
_RIVERS = ("Arlen", "Corvel", "Tamsin", "Velde", "Oskar", "Pell", "Rhune", "Sabre", "Ilse", "Marrow")
_TOWNS = ("Dunmere", "Hask", "Orrow", "Brisk", "Lunn", "Maresby", "Calder", "Ythe", "Fenwick", "Garth")
_WORKS = ("mills", "bridges", "granaries", "ferries", "dams", "weirs", "locks", "quays")
WARM_UP_FROM = 1000  # warm-up conversations read passages of their own


def passage(index: int) -> str:
    """A passage of its own per conversation (distinct for the first 100, and beyond with the numbers): the
    exact prefix cache cannot serve one agent's passage from another conversation, only reuse can."""
    river, town = _RIVERS[index % 10], _TOWNS[(index // 10 + index) % 10]
    works, weeks, families = _WORKS[(index * 3) % 8], 2 + (index * 5) % 9, 9 + index % 97
    return (
        f"The river {river} floods its valley every spring, and each summer the people of {town} rebuild the "
        f"{works}, the roads and the long stone wall that the water took. The work takes {weeks} weeks and "
        f"{families} families share it; the oldest of them keep the plans of the wall."
    )


def _log(text: str) -> None:
    print(f"[bench serve] {text}", file=sys.stderr, flush=True)


def conversation(
    url: str, model: str, passage: str, max_tokens: int, mode: str | None, api_key: str | None = None
) -> list[StreamedCall]:
    """The three agents' calls in order; stops at the first that fails (the next one needs its text)."""
    extra = {"kvmesh": {"reuse": mode}} if mode not in (None, "auto") else {}

    def call(agent: str, *texts: str) -> StreamedCall:
        messages = [{"role": "system", "content": SYSTEMS[agent]}] + [{"role": "user", "content": t} for t in texts]
        payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0} | extra
        return stream_chat(url, payload, api_key)

    calls = [call("researcher", passage)]
    if calls[-1].error is None:
        notes = calls[-1].text
        calls.append(call("writer", passage, f"Research notes:\n{notes}\n\nWrite a short summary of the passage."))
    if calls[-1].error is None and len(calls) == 2:
        draft = calls[-1].text
        calls.append(call("reviewer", passage, f"Draft:\n{draft}\n\nName one factual error, or say it is correct."))
    return calls


def run_block(
    run: Callable[[int], list[StreamedCall]], concurrency: int, conversations: int
) -> tuple[Json, list[StreamedCall]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        calls = [c for conv in pool.map(run, range(conversations)) for c in conv]
    wall = time.perf_counter() - started
    done = [c for c in calls if c.error is None]
    ttfts = [c.ttft_s for c in done if c.ttft_s is not None]
    prompt = sum(c.usage.get("prompt_tokens", 0) for c in done)
    output = sum(c.completion_tokens for c in done)
    stats = [c.kvmesh for c in done if c.kvmesh]

    def share(key: str) -> float | None:
        return sum(s[key] for s in stats) / prompt if stats and prompt else None

    block = {
        "concurrency": concurrency,
        "conversations": conversations,
        "calls": len(calls),
        "errors": len(calls) - len(done) + 3 * conversations - len(calls),  # failed, and never made (after one)
        "error_samples": sorted({c.error for c in calls if c.error})[:3],
        "empty_replies": sum(1 for c in done if not c.text),
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p99_s": _percentile(ttfts, 99),
        "output_tok_s": output / wall if wall else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "output_tokens_counted_by": "server" if all("completion_tokens" in c.usage for c in done) else "text events",
        "reused_share": share("reused_tokens"),
        "cached_share": share("cached_tokens"),
        "kvcomm_calls": sum(s["reuse_mode"] == "kvcomm" for s in stats),
        "wall_s": wall,
    }
    return block, done


def overhead(calls: list[StreamedCall]) -> Json:
    """HTTP TTFT against the worker's TTFT of the same calls (concurrency 1)."""
    pairs = [(c.ttft_s, c.kvmesh["ttft_s"]) for c in calls if c.ttft_s is not None and c.kvmesh]
    if not pairs:
        return {"calls": 0}
    http, worker = [h for h, _ in pairs], [w for _, w in pairs]
    shares = [(h - w) / h for h, w in pairs]
    share = statistics.median(shares)
    return {
        "calls": len(pairs),
        "http_ttft_p50_ms": 1000 * statistics.median(http),
        "worker_ttft_p50_ms": 1000 * statistics.median(worker),
        "overhead_p50_ms": 1000 * statistics.median(h - w for h, w in pairs),
        "overhead_p99_ms": 1000 * _percentile([h - w for h, w in pairs], 99),
        "overhead_share_p50": share,
        "target": {"value": share, "target": TARGET_OVERHEAD_SHARE, "pass": share <= TARGET_OVERHEAD_SHARE},
    }


def bench_server(
    url: str,
    model: str,
    levels: list[tuple[int, int]],
    modes: list[str | None],
    max_tokens: int,
    warm_up: int,
    first: int = 0,
) -> tuple[list[Json], list[StreamedCall]]:
    """Blocks for every (concurrency, mode), and the concurrency-1 calls (for the overhead). Conversations read
    passages first, first + 1, … (another run on the same server starts where this one's end)."""
    for index in range(warm_up):
        conversation(url, model, passage(WARM_UP_FROM + index), max_tokens, modes[0])
    blocks, single = [], []
    for concurrency, conversations in levels:
        for mode in modes:

            def run(i: int, mode: str | None = mode, first: int = first) -> list[StreamedCall]:
                return conversation(url, model, passage(first + i), max_tokens, mode)

            first += conversations

            block, done = run_block(run, concurrency, conversations)
            blocks.append({"mode": mode or "n/a"} | block)
            if concurrency == 1:
                single += done
            _log(
                f"concurrency {concurrency:>2} {mode or '':>5}: {block['calls']} calls, {block['errors']} errors, "
                f"TTFT p50 {block['ttft_p50_s'] or 0:.3f} s, {block['output_tok_s']:.1f} tok/s"
            )
    return blocks, single


def run_serve_bench(args: argparse.Namespace) -> int:
    from kvmesh.runtime import Session
    from kvmesh.runtime.serve import OpenAIServer, ServeConfig
    from kvmesh.workers.model_files import resolve_model_path

    quick = bool(args.quick)
    levels = [(1, 2), (2, 2)] if quick else [(1, 6), (8, 16), (32, 32)]
    max_tokens = 8 if quick else 32
    warm_up = 2 if quick else 8
    fidelity_items = args.fidelity_items if args.fidelity_items is not None else (1 if quick else 20)
    if fidelity_items < 0:
        raise ValueError(f"--fidelity-items must be >= 0, got {fidelity_items}")
    shapes = (
        tuple(s.strip() for s in args.fidelity_shapes.split(","))
        if args.fidelity_shapes
        else (("relay", "retrieval") if quick else SHAPES)
    )
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"--fidelity-shapes: no shape {', '.join(unknown)}; use {', '.join(SHAPES)}")
    started = time.perf_counter()
    _log("starting a session (Ray, 1 worker) and the OpenAI server …")
    with Session(workers=1, model=args.model) as session:
        with OpenAIServer(session, ServeConfig(port=0)) as server:
            ready_s = time.perf_counter() - started
            _log(
                f"serving {server.model!r} at {server.base_url} (uvicorn in the driver) after {ready_s:.1f} s; "
                f"{warm_up} warm-up conversations …"
            )
            blocks, single = bench_server(server.base_url, server.model, levels, ["auto", "dense"], max_tokens, warm_up)
            fidelity: Json = {"skipped": "--fidelity-items 0"}
            if fidelity_items:
                _log(
                    f"the fidelity tasks ({', '.join(shapes)}; {fidelity_items} a shape) through the server and "
                    "the pipeline path …"
                )
                fidelity = bench_serve_fidelity(session, server.base_url, server.model, shapes, fidelity_items, _log)
        with OpenAIServer(session, ServeConfig(port=0, ingress="serve")) as server:  # the other ingress, same workers
            _log(f"the same at concurrency 1 through a Ray Serve ingress at {server.base_url} …")
            _, serve_single = bench_server(
                server.base_url,
                server.model,
                levels[:1],
                ["auto", "dense"],
                max_tokens,
                warm_up=0,
                first=sum(n for _, n in levels) * 2,
            )
        threads = session.worker_threads
    note = "not in --quick (its server takes minutes to load and answer on a busy machine)" if quick else missing_note()
    llama: Json = {"skipped": note}
    if note is None:
        _log("llama-cpp-python's server on the same GGUF …")
        try:
            with llama_cpp_server(resolve_model_path(args.model), threads) as url:
                llama = {
                    "blocks": bench_server(url, MODEL_ALIAS, levels, [None], max_tokens, warm_up=1)[0],
                    "model": "the same GGUF file, computed by llama.cpp in its own format",
                }
        except RuntimeError as exc:  # the comparison column failed: kvmesh's figures still stand
            _log(f"llama-cpp-python's column failed: {exc}")
            llama = {"skipped": f"failed: {exc}"}
    widest = max(c for c, _ in levels)
    report: Json = {
        "blocks": blocks,
        "overhead_c1": overhead(single),
        "overhead_c1_serve_ingress": overhead(serve_single),
        f"streams_{widest}_errors": sum(b["errors"] for b in blocks if b["concurrency"] == widest),
        "llama_cpp_python": llama,
        "fidelity": fidelity,
        "settings": {
            "levels": levels,
            "max_tokens": max_tokens,
            "warm_up": warm_up,
            "agents": list(SYSTEMS),
            "temperature": 0,
            "ingress": "driver",
            "replicas": 1,
            "workers": 1,
        },
        "definitions": DEFINITIONS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "quick": quick,
            "worker_threads": threads,
        },
        "ready_s": ready_s,
        "wall_s": time.perf_counter() - started,
    }
    _print(report)
    save_json(args.json_path, report, _log)
    return 0


DEFINITIONS = {
    "ttft": "client: request sent -> first event carrying text (streamed, include_usage)",
    "output_tok_s": "the block's completion tokens / its wall time (all conversations together); tokens as the "
    "server's usage counts them, else its text events (one per token: llama-cpp-python's server sends no usage)",
    "reused_share": "prompt tokens served from segments' KV (kvmesh.reused_tokens) / prompt tokens",
    "cached_share": "prompt tokens served by the exact prefix cache (kvmesh.cached_tokens) / prompt tokens",
    "overhead": "HTTP TTFT - kvmesh.ttft_s (the worker's, from the call's arrival there) of the same call, "
    "concurrency 1, both modes; share = overhead / HTTP TTFT, median over calls",
    "errors": "failed calls, and calls never made because an earlier one of the conversation failed",
    "empty_replies": "calls that succeeded with no text at all (a server that drops a stream it was serving)",
}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100  # linear interpolation between the nearest ranks
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _print(report: Json) -> None:
    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.0%}"

    rows = [("kvmesh", b) for b in report["blocks"]]
    rows += [("llama-cpp", b) for b in report["llama_cpp_python"].get("blocks", [])]
    print(
        f"{'server':<10} {'mode':<6} {'conc':>4} {'calls':>5} {'errors':>6} {'empty':>5} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'tok/s':>7} {'wall s':>7} {'reused':>6} {'cached':>6}"
    )
    for server, b in rows:
        print(
            f"{server:<10} {b['mode']:<6} {b['concurrency']:>4} {b['calls']:>5} {b['errors']:>6} "
            f"{b['empty_replies']:>5} {b['ttft_p50_s'] or 0:>8.3f}s {b['ttft_p99_s'] or 0:>8.3f}s "
            f"{b['output_tok_s']:>7.1f} {b['wall_s']:>7.1f} {pct(b['reused_share'])} {pct(b['cached_share'])}"
        )
    empty = sum(b["empty_replies"] for _, b in rows)
    if empty:
        print(f"WARNING: {empty} calls came back with no text: their blocks' wall times and rates are not comparable")
    for key, ingress in (("overhead_c1", "uvicorn in the driver"), ("overhead_c1_serve_ingress", "Ray Serve")):
        o = report[key]
        if o.get("calls"):
            verdict = "meets" if o["target"]["pass"] else "misses"
            print(
                f"HTTP + routing overhead at concurrency 1, {ingress} ({o['calls']} calls): TTFT through HTTP p50 "
                f"{o['http_ttft_p50_ms']:.1f} ms, the worker's {o['worker_ttft_p50_ms']:.1f} ms: "
                f"+{o['overhead_p50_ms']:.1f} ms = {o['overhead_share_p50']:.1%} of TTFT ({verdict} the "
                f"{TARGET_OVERHEAD_SHARE:.0%} target)"
            )
    if "shapes" in report["fidelity"]:
        print_serve_fidelity(report["fidelity"])
    skipped = report["llama_cpp_python"].get("skipped")
    if skipped:
        print(f"llama-cpp-python column skipped: {skipped}")
