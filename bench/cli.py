"""`kvmesh bench <kind>`: the benchmarks' subcommands; kvmesh/cli.py adds them beside the runtime's commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from kvmesh.runtime.cli import add_model_options


def add_bench_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="benchmarks (write JSON)")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    engine_bench = bench_kinds.add_parser("engine", help="engine speed against its physical floors")
    engine_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    engine_bench.add_argument("--quick", action="store_true", help="short lengths, for smoke tests")
    add_model_options(engine_bench)
    engine_bench.set_defaults(handler=_deferred("engine_bench", "run_engine_bench"))

    fanout_bench = bench_kinds.add_parser(
        "fanout", help="agents decoding over one shared prefix: copied into each agent's KV vs read in place"
    )
    fanout_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    fanout_bench.add_argument("--quick", action="store_true", help="3 agents, a 256-token prefix, 8 tokens each")
    fanout_bench.add_argument("--agents", type=int, default=None, help="agents sharing the prefix (default 8; 3 quick)")
    add_model_options(fanout_bench)
    fanout_bench.set_defaults(handler=_deferred("fanout_bench", "run_fanout_bench"))

    suffix_bench = bench_kinds.add_parser("suffix", help="SuffixDecoding speculation on agent-loop workloads")
    suffix_bench.add_argument(
        "--workload",
        dest="workloads",
        action="append",
        default=[],
        help="a workload JSON file (repeatable; default: the shipped ones)",
    )
    suffix_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    suffix_bench.add_argument("--quick", action="store_true", help="one short session per workload, for smoke tests")
    suffix_bench.add_argument("--spec-factor", type=float, default=None, help="draft tokens per matched token")
    suffix_bench.add_argument("--max-spec-tokens", type=int, default=None, help="draft size cap")
    suffix_bench.add_argument("--chain", action="store_true", help="chain drafts instead of trees")
    suffix_bench.add_argument("--no-adaptive", action="store_true", help="verify every draft whole (no cost model)")
    add_model_options(suffix_bench)
    suffix_bench.set_defaults(handler=_bench_suffix)

    kvcomm_bench = bench_kinds.add_parser("kvcomm", help="KVCOMM beside dense, prefix-only and naive reuse")
    kvcomm_bench.add_argument(
        "--workload", default=None, help="workload file (default: bench/workloads/kvcomm/default.json)"
    )
    kvcomm_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    kvcomm_bench.add_argument("--quick", action="store_true", help="a small TTFT setting and 4 task items")
    kvcomm_bench.add_argument("--store", choices=("redis", "memory"), default="redis", help="where anchors live")
    add_model_options(kvcomm_bench)
    kvcomm_bench.set_defaults(handler=_deferred("kvcomm_bench", "run_kvcomm_bench"))

    blend_bench = bench_kinds.add_parser("blend", help="CacheBlend on retrieval beside dense, full reuse and KVCOMM")
    blend_bench.add_argument(
        "--workload", default=None, help="workload file (default: bench/workloads/blend/retrieval.json)"
    )
    blend_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    blend_bench.add_argument("--quick", action="store_true", help="4 questions, 3 modes")
    add_model_options(blend_bench)
    blend_bench.set_defaults(handler=_deferred("blend_bench", "run_blend_bench"))

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
    add_model_options(fidelity_bench)
    fidelity_bench.set_defaults(handler=_deferred("fidelity_bench", "run_fidelity_bench"))

    fidelity_diff = bench_kinds.add_parser(
        "fidelity-diff", help="two fidelity runs (e.g. two weight formats) paired item by item: B - A with its CI"
    )
    fidelity_diff.add_argument("a", help="a `kvmesh bench fidelity --json` file (the reference)")
    fidelity_diff.add_argument("b", help="another, over the same items")
    fidelity_diff.add_argument("--json", dest="json_path", default=None, help="write the comparison here")
    fidelity_diff.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    fidelity_diff.set_defaults(handler=_deferred("fidelity_diff", "run_fidelity_diff"))

    runtime_bench = bench_kinds.add_parser("runtime", help="agent-to-agent latency and orchestration overhead")
    runtime_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    runtime_bench.add_argument("--quick", action="store_true", help="fewer calls, one run per chain, 4 tokens")
    runtime_bench.add_argument("--model", default="smollm2", help="the worker's model (default: smollm2)")
    runtime_bench.add_argument(
        "--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an embedded local one)"
    )
    runtime_bench.set_defaults(handler=_deferred("runtime_bench", "run_runtime_bench"))

    cluster_bench = bench_kinds.add_parser(
        "cluster", help="concurrent runs on one worker and on two, on a two-node Ray cluster started here"
    )
    cluster_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    cluster_bench.add_argument("--quick", action="store_true", help="one block of 6 runs, half-length outputs")
    cluster_bench.add_argument("--concurrency", type=int, default=None, help="runs at a time (default 8; quick 4)")
    cluster_bench.add_argument("--runs", type=int, default=None, help="runs per measured block (default 16; quick 6)")
    cluster_bench.set_defaults(handler=_deferred("cluster_bench", "run_cluster_bench"))

    serve_bench = bench_kinds.add_parser(
        "serve", help="a multi-agent app through `kvmesh serve` at 1, 8 and 32 concurrent conversations"
    )
    serve_bench.add_argument("--json", dest="json_path", default=None, help="write the results here")
    serve_bench.add_argument("--quick", action="store_true", help="concurrency 1 and 2, short replies, for smoke tests")
    serve_bench.add_argument("--model", default="smollm2", help="the worker's model (default: smollm2)")
    serve_bench.add_argument(
        "--fidelity-items",
        type=int,
        default=None,
        metavar="N",
        help="fidelity items a shape through the server and the pipeline path (default: 20; --quick: 1; 0: skip)",
    )
    serve_bench.add_argument(
        "--fidelity-shapes",
        default=None,
        metavar="S,S",
        help="fidelity shapes (default: relay,retrieval,critique; --quick: relay,retrieval)",
    )
    serve_bench.set_defaults(handler=_deferred("serve_bench", "run_serve_bench"))


# Each benchmark loads only when its command runs: `kvmesh --help` stays cheap.
def _deferred(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports bench.<module> when called and runs its <function>(args)."""

    def handler(args: argparse.Namespace) -> int:
        run: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return run(args)

    return handler


def _bench_suffix(args: argparse.Namespace) -> int:
    from .suffix_bench import run_suffix_bench
    from .workload import WorkloadError

    try:
        return run_suffix_bench(args)
    except WorkloadError as exc:
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2
