"""`kvmesh bench runtime`: what the distributed runtime costs beside the work it orchestrates.

Message latency. A probe actor sends the message agents send each other (an OUTPUT, ~300 bytes) to a
real agent actor of a real Session: AgentService.Deliver over loopback gRPC through the runtime's own
plumbing (Channels, client and server interceptors, the session's token when set) into the agent's
inbox, and back with the Ack. Beside it, in the same run and interleaved in blocks: a direct Ray actor
call from the same probe to the same agent actor (`ready()`, the lightest method), and the floor, a
bare gRPC unary call (no interceptors, empty bytes) to a server in the bench's own process.

Orchestration overhead. A 10-agent chain (each agent reads the previous one's output) run through the
Session against one SmolLM2 worker, each agent generating 1 token, then 32 (the target's setting). Per
run: overhead share = 1 - model_s / wall_s, where
  model_s = the engine's time over the run's calls, from each call's CallStats: TTFT (the request's
            arrival in the engine to its first token: prefill) + decode ((output_tokens - 1) / decode_tok_s);
  wall_s  = the time session.run() took, as its caller sees it (agent actors already started).
The rest splits into `in_calls_s` (inside the agents' calls but not in the engine: rendering, routing,
the Generate RPC, waiting at the worker, streaming) and `between_calls_s` (START delivery, the OUTPUT hop
to the next agent, the driver's bookkeeping). A second session, traced into memory, runs each chain once
more and splits its critical path by the spans (runtime_breakdown.py); --quick uses one traced session.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from .json_report import save_json
from .prefill_parity import TARGET_PREFILL_PARITY, bench_prefill_parity
from .runtime_breakdown import breakdown

Json = dict[str, Any]
TARGET_GRPC_P50_MS = 1.0  # agent-to-agent message on loopback
TARGET_OVERHEAD_SHARE = 0.10  # of a 10-agent chain generating 32 tokens per agent
TOPICS = ("whales", "volcanoes", "the moon", "bread", "trains", "bees", "glaciers", "libraries", "violins", "deserts")
CHAIN_AGENTS = len(TOPICS)  # one essay writer per topic
CHAIN_QUERY = "Be thorough and specific."
_TEXT = "The harbour was quiet that morning; only the gulls moved, circling the fishing boats. " * 3


def _log(text: str) -> None:
    print(f"[bench runtime] {text}", file=sys.stderr, flush=True)


class LatencyProbe:
    """Runs as its own actor and times calls from there, as an agent's process would make them."""

    def __init__(self, config: Any, driver_key: str) -> None:
        from kvmesh.runtime.grpc_client import Channels

        self.channels = Channels(config)
        self.driver_key = driver_key  # its CANCEL (clearing the inbox it filled) is the driver's to send

    def deliver_ms(self, address: str, run_id: str, n: int) -> list[float]:
        from kvmesh.agents import Phase
        from kvmesh.runtime.wire import Kind, message
        from kvmesh.v1 import agent_pb2_grpc, worker_pb2

        stub = agent_pb2_grpc.AgentServiceStub(self.channels.get(address))
        stats = worker_pb2.CallStats(prompt_tokens=120, output_tokens=32, ttft_s=0.1, model="smollm2")
        # an OUTPUT no START will ever claim: the inbox keeps the latest one per source (CANCEL drops it)
        msg = message(Kind.OUTPUT, run_id, Phase(0), "probe", target="agent", text=_TEXT, stats=stats)
        return _timed(lambda: stub.Deliver(msg), n)

    def cancel(self, address: str, run_id: str) -> None:
        from kvmesh.runtime.call_metadata import from_driver
        from kvmesh.runtime.wire import Kind
        from kvmesh.v1 import agent_pb2, agent_pb2_grpc

        stub = agent_pb2_grpc.AgentServiceStub(self.channels.get(address))
        cancel = agent_pb2.Message(kind=Kind.CANCEL, run_id=run_id, source="probe")
        stub.Deliver(cancel, metadata=from_driver(self.driver_key))

    def ray_ms(self, handle: Any, n: int) -> list[float]:
        import ray

        return _timed(lambda: ray.get(handle.ready.remote()), n)

    def bare_grpc_ms(self, address: str, n: int) -> list[float]:
        with grpc.insecure_channel(address) as channel:
            ping = channel.unary_unary("/kvmesh.bench.Echo/Ping")
            return _timed(lambda: ping(b""), n)


def _timed(call: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _bare_server() -> tuple[grpc.Server, str]:
    """The floor: a gRPC server with nothing on it but an echo, no interceptors."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("kvmesh.bench.Echo", {"Ping": echo})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _quantiles(times: list[float]) -> Json:
    ordered = sorted(times)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered),
        "n": len(ordered),
    }


def bench_latency(session: Any, calls: int, block: int = 200, warmup: int = 50) -> Json:
    """gRPC Deliver, Ray call and bare gRPC from one probe actor to one agent actor, in interleaved blocks."""
    import ray

    from kvmesh.agents import Agent, Pipeline

    pipeline = Pipeline("latency", [Agent("target", "{query}", max_tokens=1)])
    handle = session.agent_actors(pipeline)["target"]
    address = ray.get(handle.ready.remote())
    probe = ray.remote(LatencyProbe).options(num_cpus=0).remote(session.config, session.driver_key)
    server, bare_address = _bare_server()
    run_id = f"bench-latency-{os.getpid()}"
    measured: dict[str, list[float]] = {"grpc": [], "ray": [], "bare": []}
    try:
        ray.get(
            [
                probe.deliver_ms.remote(address, run_id, warmup),
                probe.ray_ms.remote(handle, warmup),
                probe.bare_grpc_ms.remote(bare_address, warmup),
            ]
        )
        for _ in range(max(1, calls // block)):  # interleaved: a noisy second hits all three alike
            measured["grpc"] += ray.get(probe.deliver_ms.remote(address, run_id, block))
            measured["ray"] += ray.get(probe.ray_ms.remote(handle, block))
            measured["bare"] += ray.get(probe.bare_grpc_ms.remote(bare_address, block))
        ray.get(probe.cancel.remote(address, run_id))
    finally:
        server.stop(0)
        ray.kill(probe)
        session.release(pipeline)
    return {kind: _quantiles(times) for kind, times in measured.items()}


def chain_pipeline(max_tokens: int) -> Any:
    """kvmesh.chain of 10 essay writers, each reading the previous one's text. Sampled (seeded): greedy
    SmolLM2 stops early on these prompts, and the target wants every agent to generate max_tokens."""
    from kvmesh.agents import chain

    roles = {f"a{i}": f"Write a long, detailed essay about {topic}." for i, topic in enumerate(TOPICS)}
    return chain(f"chain{CHAIN_AGENTS}x{max_tokens}", roles, max_tokens=max_tokens, temperature=0.9, seed=7)


def chain_run(session: Any, pipeline: Any, query: str) -> Json:
    started = time.perf_counter()
    result = session.run(pipeline, query)
    wall = time.perf_counter() - started
    calls = [r.stats for r in result.calls]
    model = [c.ttft_s + ((c.output_tokens - 1) / c.decode_tok_s if c.decode_tok_s else 0.0) for c in calls]
    model_s = sum(model)
    in_calls = sum(r.wall_s for r in result.calls)
    run: Json = {
        "wall_s": wall,
        "run_loop_wall_s": result.wall_s,
        "model_s": model_s,
        "overhead_share": 1 - model_s / wall,
        "overhead_per_hop_ms": (wall - model_s) / len(calls) * 1000,
        "in_calls_s": in_calls - model_s,
        "between_calls_s": wall - in_calls,
        "prefill_s": sum(c.ttft_s for c in calls),
        "output_tokens": [c.output_tokens for c in calls],
        "prompt_tokens": [c.prompt_tokens for c in calls],
        "reuse_modes": sorted({c.reuse_mode for c in calls}),
    }
    if "memory" in session.config.trace_exporters:
        run["trace"] = breakdown(session.finished_spans(), result.run_id)
    return run


def bench_chain(session: Any, max_tokens: int, runs: int) -> Json:
    pipeline = chain_pipeline(max_tokens)
    session.run(pipeline, "A warm-up. " + CHAIN_QUERY)  # starts the agent actors; not measured
    if "memory" in session.config.trace_exporters:
        session.finished_spans()  # drop the warm-up's spans
    measured = []
    for i in range(runs):
        measured.append(chain_run(session, pipeline, f"Take {i + 1}. {CHAIN_QUERY}"))  # no whole-prompt hits
        _log(
            f"chain x{max_tokens} run {i + 1}: overhead {measured[-1]['overhead_share']:.1%}, "
            f"wall {measured[-1]['wall_s']:.2f} s"
        )
    session.release(pipeline)
    median = sorted(measured, key=lambda r: r["overhead_share"])[len(measured) // 2]
    return {"agents": CHAIN_AGENTS, "max_tokens": max_tokens, "runs": measured, "median": median}


def run_runtime_bench(args: argparse.Namespace) -> int:
    from kvmesh.runtime import RuntimeConfig, Session

    quick = bool(args.quick)
    long_tokens = 4 if quick else 32
    started = time.perf_counter()
    # full: the figures from a session as configured (tracing as the environment says, normally off), the
    # breakdown from a second one traced into memory; quick: one traced session for both
    traced = RuntimeConfig(trace="memory")
    plain = traced if quick else RuntimeConfig()
    _log("starting a session (Ray, 1 worker) …")
    with Session(workers=1, model=args.model, address=args.address, config=plain) as session:
        ready_s = time.perf_counter() - started
        _log(f"ready in {ready_s:.1f} s ({session.worker_threads} thread(s) per worker); prefill parity …")
        parity = bench_prefill_parity(session, rounds=1 if quick else 5, log=_log)
        _log("message latency …")
        latency = bench_latency(session, calls=400 if quick else 2000)
        _log("10-agent chains …")
        short = bench_chain(session, 1, runs=1 if quick else 5)
        long = bench_chain(session, long_tokens, runs=1 if quick else 3)
        if quick:
            traced_short, traced_long = short, long
    if not quick:
        _log("a traced session: where the time goes …")
        with Session(workers=1, model=args.model, address=args.address, config=traced) as session:
            traced_short = bench_chain(session, 1, runs=1)
            traced_long = bench_chain(session, long_tokens, runs=1)
    report: Json = {
        "grpc_p50_ms": latency["grpc"]["p50_ms"],
        "grpc_p99_ms": latency["grpc"]["p99_ms"],
        "ray_call_p50_ms": latency["ray"]["p50_ms"],
        "ray_call_p99_ms": latency["ray"]["p99_ms"],
        "overhead_share": short["median"]["overhead_share"],  # 1-token chain
        "overhead_share_long": long["median"]["overhead_share"],  # 32-token chain (the target's setting)
        "long_max_tokens": long_tokens,
        "overhead_share_traced": {
            "1": traced_short["median"]["overhead_share"],
            str(long_tokens): traced_long["median"]["overhead_share"],
        },
        "prefill_parity": parity,
        "floor": {"grpc_bare_p50_ms": latency["bare"]["p50_ms"], "grpc_bare_p99_ms": latency["bare"]["p99_ms"]},
        "latency": latency,
        "chain_1": short,
        f"chain_{long_tokens}": long,
        "breakdown": {"1": traced_short["median"]["trace"], str(long_tokens): traced_long["median"]["trace"]},
        "targets": {
            "grpc_p50_ms": _target(latency["grpc"]["p50_ms"], TARGET_GRPC_P50_MS),
            "overhead_share_long": None if quick else _target(long["median"]["overhead_share"], TARGET_OVERHEAD_SHARE),
            "prefill_parity": None if quick else _target(parity["ratio"], TARGET_PREFILL_PARITY),
        },
        "definitions": DEFINITIONS,
        "session": {"token": bool(plain.token), "tls": plain.tls, "trace": plain.trace, "ready_s": ready_s},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "quick": quick},
        "wall_s": time.perf_counter() - started,
    }
    _print(report)
    save_json(args.json_path, report, _log)
    return 0


DEFINITIONS = {
    "grpc": "AgentService.Deliver of a ~300-byte OUTPUT, probe actor -> agent actor, loopback, the runtime's "
    "interceptors; round trip to the Ack",
    "ray_call": "ray.get(agent_actor.ready.remote()) from the same probe actor to the same agent actor",
    "floor.grpc_bare": "unary call, empty bytes, no interceptors, probe actor -> the bench's process",
    "overhead_share": "1 - model_s / wall_s; model_s = sum over calls of TTFT + (output_tokens - 1) / "
    "decode_tok_s (engine time incl. the reuse planner's reported planning, from CallStats); wall_s = "
    "session.run() as its caller sees it; overhead_share: 1-token chain, overhead_share_long: long_max_tokens",
    "in_calls_s": "sum of the agents' call wall times minus model_s",
    "between_calls_s": "wall_s minus the sum of the agents' call wall times",
    "prefill_parity": "median dense TTFT (worker-reported: planning + engine) of one ~1.5K-token prompt through "
    "the session's worker actor / the same in an in-process worker built alike (build_worker), alternating",
    "breakdown": "critical path of one traced run (bench/runtime_breakdown.py): lead_in, chat (= model + "
    "worker_wait + worker_other), hops between calls, tail",
}


def _target(value: float, target: float) -> Json:
    return {"value": value, "target": target, "pass": value <= target}


def _print(report: Json) -> None:
    latency = report["latency"]
    print("message latency (ms)        p50     p90     p99")
    for label, key in (("gRPC Deliver (agent)", "grpc"), ("Ray actor call", "ray"), ("bare gRPC (floor)", "bare")):
        q = latency[key]
        print(f"  {label:<24} {q['p50_ms']:6.2f}  {q['p90_ms']:6.2f}  {q['p99_ms']:6.2f}")
    print(f"\n{CHAIN_AGENTS}-agent chain (median run)   wall s  model s  overhead  per hop ms  in calls s  between s")
    for key in ("chain_1", f"chain_{report['long_max_tokens']}"):
        m = report[key]["median"]
        print(
            f"  {report[key]['max_tokens']:>2} token(s) per agent       {m['wall_s']:6.2f}  {m['model_s']:7.2f}  "
            f"{m['overhead_share']:8.1%}  {m['overhead_per_hop_ms']:10.1f}  {m['in_calls_s']:10.2f}  "
            f"{m['between_calls_s']:9.2f}"
        )
    print("\nwhere it goes (traced run, ms)   model  worker wait  worker other   hops  lead-in+tail   hop mean")
    for tokens, b in report["breakdown"].items():
        t = b["totals_ms"]
        print(
            f"  {tokens:>2} token(s) per agent       {t['model']:6.0f}  {t['worker_wait']:11.0f}  "
            f"{t['worker_other']:12.0f}  {t['hops']:5.0f}  {t['lead_in_and_tail']:12.0f}  {b['hop_mean_ms']:9.1f}"
        )
    parity = report["prefill_parity"]
    print(
        f"\nprefill parity ({parity['prompt_tokens']} tokens, dense, {parity['worker_threads']} thread(s) per "
        f"worker): session {statistics.median(parity['session_ttft_s']):.3f} s / in-process "
        f"{statistics.median(parity['inprocess_ttft_s']):.3f} s = {parity['ratio']:.2f}"
    )
    for name, target in report["targets"].items():
        if target is not None:
            verdict = "PASS" if target["pass"] else "MISS"
            print(f"target {name} <= {target['target']}: {target['value']:.3f} {verdict}")
