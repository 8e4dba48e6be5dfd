"""The runtime's `kvmesh` commands: generate, run, demo and serve, and the model options bench/cli.py shares.

kvmesh/cli.py puts them under one parser with `kvmesh bench`: runtime never imports bench (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kvmesh.workers.linear import WEIGHT_FORMATS


def add_model_options(parser: argparse.ArgumentParser, model_default: str | None = "smollm2") -> None:
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
    add_model_options(parser, model_default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per worker (default: the node's cores shared)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up on the run after this many seconds")
    parser.add_argument("--tokens", action="store_true", help="stream the agents' text as it decodes")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")


def add_runtime_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser("generate", help="stream a chat reply from the engine")
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--system", default=None, help="system message (default: the model's own)")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_model_options(generate)
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
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="where the HTTP server listens (default 127.0.0.1; any other host requires an API key)",
    )
    serve.add_argument("--port", type=int, default=8000, help="its port (default 8000; 0: a free one)")
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: "
        "KVMESH_API_KEY; prefer it: a command line is visible to other users)",
    )
    serve.add_argument(
        "--ingress",
        choices=("driver", "serve"),
        default="driver",
        help="driver: uvicorn in this "
        "process (default; no extra hop); serve: a Ray Serve deployment, for --replicas > 1",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="HTTP ingress replicas behind Ray Serve (default 1; needs --ingress serve)",
    )
    serve.add_argument("--workers", type=int, default=1, help="inference worker actors (default 1)")
    serve.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an embedded local one)"
    )
    add_model_options(serve, model_default=None)
    serve.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per worker (default: the node's cores shared)"
    )
    serve.set_defaults(handler=_serve)


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
