"""The `kvmesh` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from kvmesh.workers.linear import WEIGHT_FORMATS
from kvmesh.workers.model_config import UnsupportedModelError
from kvmesh.workers.model_files import ModelLoadError
from kvmesh.workers.sampling import InvalidRequestError

_terminated = threading.Event()


def _add_model_options(parser: argparse.ArgumentParser, model_default: str | None = "smollm2") -> None:
    parser.add_argument(
        "--model",
        default=model_default,
        help="'smollm2' (bundled), a .gguf file or an HF directory"
        + (f" (default {model_default})" if model_default else " (default: KVMESH_MODEL, else smollm2)"),
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--weights", choices=WEIGHT_FORMATS, default=None, help="weight format (default: fp32 on CPU, bf16 on CUDA)"
    )


def _generate(args: argparse.Namespace) -> int:
    from kvmesh.workers.engine import Engine
    from kvmesh.workers.sampling import SamplingParams

    sampling = SamplingParams(  # validated before the model loads: a typo should not cost a load
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, weight_format=args.weights)
    loaded = time.perf_counter() - started
    prompt = engine.chat_prompt(args.prompt, system=args.system)
    for event in engine.stream(prompt, sampling):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        if event.finished and event.stats is not None:
            stats = event.stats
            rate = f"{stats.decode_tok_s:.1f} tok/s" if stats.decode_tok_s else "n/a"
            print(
                f"\n[{engine.model.config.name}: load {loaded:.1f}s, {stats.prompt_tokens} prompt tokens, "
                f"TTFT {stats.ttft_s:.2f}s, {stats.output_tokens} tokens at {rate}, finish: {event.finish_reason}]",
                file=sys.stderr,
            )
    return 0


def _add_run_options(parser: argparse.ArgumentParser, max_tokens_default: int | None) -> None:
    parser.add_argument("--workers", type=int, default=1, help="inference worker actors (default 1)")
    parser.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an embedded local one)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens_default,
        help="cap every agent's max_tokens" + (f" (default {max_tokens_default})" if max_tokens_default else ""),
    )
    _add_model_options(parser, model_default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per worker (default: the node's cores shared)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up on the run after this many seconds")
    parser.add_argument("--tokens", action="store_true", help="stream the agents' text as it decodes")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description="Multi-agent LLM pipelines with shared KV caches.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream a chat reply from the engine")
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--system", default=None, help="system message (default: the model's own)")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_model_options(generate)
    generate.set_defaults(handler=_generate)

    run = commands.add_parser("run", help="run a pipeline file (it defines `pipeline = kvmesh.Pipeline(...)`)")
    run.add_argument("file", help="a Python file defining `pipeline`, e.g. examples/debate.py")
    run.add_argument("--query", required=True, help="the user's input, {query} in templates")
    _add_run_options(run, None)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="a bundled 4-agent pipeline on SmolLM2 answering three questions in one session, with tables"
    )
    demo.add_argument("--query", default=None, help="one question of your own (default: the demo's three)")
    _add_run_options(demo, None)
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP API (/v1/chat/completions) over the workers, until Ctrl-C"
    )
    serve.add_argument("--host", default="127.0.0.1", help="where the HTTP server listens (default 127.0.0.1; "
                       "any other host requires an API key)")
    serve.add_argument("--port", type=int, default=8000, help="its port (default 8000; 0: a free one)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                       "KVMESH_API_KEY; prefer it: a command line is visible to other users)")
    serve.add_argument("--replicas", type=int, default=1, help="HTTP ingress replicas behind Ray Serve (default 1)")
    serve.add_argument("--workers", type=int, default=1, help="inference worker actors (default 1)")
    serve.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an embedded local one)"
    )
    _add_model_options(serve, model_default=None)
    serve.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per worker (default: the node's cores shared)"
    )
    serve.set_defaults(handler=_serve)

    bench = commands.add_parser("bench", help="benchmarks (write JSON)")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    engine_bench = bench_kinds.add_parser("engine", help="engine speed against its physical floors")
    engine_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    engine_bench.add_argument("--quick", action="store_true", help="short lengths, for smoke tests")
    _add_model_options(engine_bench)
    engine_bench.set_defaults(handler=_bench_engine)

    suffix_bench = bench_kinds.add_parser("suffix", help="SuffixDecoding speculation on agent-loop workloads")
    suffix_bench.add_argument("--workload", dest="workloads", action="append", default=[],
                              help="a workload JSON file (repeatable; default: the shipped ones)")
    suffix_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    suffix_bench.add_argument("--quick", action="store_true", help="one short session per workload, for smoke tests")
    suffix_bench.add_argument("--spec-factor", type=float, default=None, help="draft tokens per matched token")
    suffix_bench.add_argument("--max-spec-tokens", type=int, default=None, help="draft size cap")
    suffix_bench.add_argument("--chain", action="store_true", help="chain drafts instead of trees")
    suffix_bench.add_argument("--no-adaptive", action="store_true", help="verify every draft whole (no cost model)")
    _add_model_options(suffix_bench)
    suffix_bench.set_defaults(handler=_bench_suffix)

    kvcomm_bench = bench_kinds.add_parser("kvcomm", help="KVCOMM beside dense, prefix-only and naive reuse")
    kvcomm_bench.add_argument(
        "--workload", default=None, help="workload file (default: bench/workloads/kvcomm/default.json)"
    )
    kvcomm_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    kvcomm_bench.add_argument("--quick", action="store_true", help="a small TTFT setting and 4 task items")
    kvcomm_bench.add_argument("--store", choices=("redis", "memory"), default="redis", help="where anchors live")
    _add_model_options(kvcomm_bench)
    kvcomm_bench.set_defaults(handler=_bench_kvcomm)

    blend_bench = bench_kinds.add_parser("blend", help="CacheBlend on retrieval beside dense, full reuse and KVCOMM")
    blend_bench.add_argument(
        "--workload", default=None, help="workload file (default: bench/workloads/blend/retrieval.json)"
    )
    blend_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    blend_bench.add_argument("--quick", action="store_true", help="4 questions, 3 modes")
    _add_model_options(blend_bench)
    blend_bench.set_defaults(handler=_bench_blend)

    fidelity_bench = bench_kinds.add_parser(
        "fidelity", help="do the reuse modes keep dense's answers? relay, retrieval and critique, paired"
    )
    fidelity_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    fidelity_bench.add_argument("--quick", action="store_true", help="4 items per shape (2 per split)")
    fidelity_bench.add_argument(
        "--modes", default=None,
        help="comma-separated variants, dense required (default dense,auto,kvcomm,blend; forms: "
        "bench/fidelity_variants.py)",
    )  # fmt: skip
    fidelity_bench.add_argument(
        "--shapes", default=None, help="comma-separated item shapes (default relay,retrieval,critique)"
    )
    fidelity_bench.add_argument("--split", choices=("tune", "holdout"), default=None, help="one split (default both)")
    fidelity_bench.add_argument(
        "--sweep", action="store_true",
        help="the reuse-accuracy frontier: every method of fidelity_variants.SWEEP on the tune split of relay and "
        "retrieval (unless --modes/--shapes/--split say otherwise), plotted",
    )  # fmt: skip
    fidelity_bench.add_argument(
        "--plot", default=None, help="write the frontier plot here (PNG; with --sweep, default: beside --json)"
    )
    fidelity_bench.add_argument("--limit", type=int, default=None, help="at most N items per shape")
    fidelity_bench.add_argument("--seed", type=int, default=0, help="the items' and the bootstrap's seed")
    _add_model_options(fidelity_bench)
    fidelity_bench.set_defaults(handler=_bench_fidelity)

    runtime_bench = bench_kinds.add_parser("runtime", help="agent-to-agent latency and orchestration overhead")
    runtime_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    runtime_bench.add_argument("--quick", action="store_true", help="fewer calls, one run per chain, 4 tokens")
    runtime_bench.add_argument("--model", default="smollm2", help="the worker's model (default: smollm2)")
    runtime_bench.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an embedded local one)"
    )
    runtime_bench.set_defaults(handler=_bench_runtime)

    cluster_bench = bench_kinds.add_parser(
        "cluster", help="concurrent runs on one worker and on two, on a two-node Ray cluster started here"
    )
    cluster_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    cluster_bench.add_argument("--quick", action="store_true", help="one block of 6 runs, half-length outputs")
    cluster_bench.add_argument("--concurrency", type=int, default=None, help="runs at a time (default 8; quick 4)")
    cluster_bench.add_argument("--runs", type=int, default=None, help="runs per measured block (default 16; quick 6)")
    cluster_bench.set_defaults(handler=_bench_cluster)

    serve_bench = bench_kinds.add_parser(
        "serve", help="a multi-agent app through `kvmesh serve` at 1, 8 and 32 concurrent conversations"
    )
    serve_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    serve_bench.add_argument("--quick", action="store_true", help="concurrency 1 and 4, short replies")
    serve_bench.add_argument("--model", default="smollm2", help="the worker's model (default: smollm2)")
    serve_bench.set_defaults(handler=_bench_serve)
    return parser


def _bench_engine(args: argparse.Namespace) -> int:
    from kvmesh.bench.engine_bench import run_engine_bench

    return run_engine_bench(args)


def _run(args: argparse.Namespace) -> int:
    from .pipeline_runs import load_pipeline, run_pipeline

    return run_pipeline(load_pipeline(args.file), [args.query], args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_MAX_TOKENS, DEMO_QUESTIONS, demo_pipeline
    from .pipeline_runs import run_pipeline

    max_tokens = args.max_tokens or int(os.environ.get("KVMESH_DEMO_MAX_TOKENS", DEMO_MAX_TOKENS))
    args.max_tokens = None  # already applied
    questions = [args.query] if args.query else list(DEMO_QUESTIONS)
    return run_pipeline(demo_pipeline(max_tokens), questions, args, demo=True)


def _serve(args: argparse.Namespace) -> int:
    from .serve import run_serve

    return run_serve(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from kvmesh.bench.serve_bench import run_serve_bench

    return run_serve_bench(args)


def _bench_blend(args: argparse.Namespace) -> int:
    from kvmesh.bench.blend_bench import run_blend_bench

    return run_blend_bench(args)


def _bench_fidelity(args: argparse.Namespace) -> int:
    from kvmesh.bench.fidelity_bench import run_fidelity_bench

    return run_fidelity_bench(args)


def _bench_kvcomm(args: argparse.Namespace) -> int:
    from kvmesh.bench.kvcomm_bench import run_kvcomm_bench

    return run_kvcomm_bench(args)


def _bench_runtime(args: argparse.Namespace) -> int:
    from kvmesh.bench.runtime_bench import run_runtime_bench

    return run_runtime_bench(args)


def _bench_cluster(args: argparse.Namespace) -> int:
    from kvmesh.bench.cluster_bench import run_cluster_bench

    return run_cluster_bench(args)


def _bench_suffix(args: argparse.Namespace) -> int:
    from kvmesh.bench.suffix_bench import run_suffix_bench
    from kvmesh.bench.workload import WorkloadError

    try:
        return run_suffix_bench(args)
    except WorkloadError as exc:
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2


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


if __name__ == "__main__":
    sys.exit(main())
