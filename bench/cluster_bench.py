"""`kvmesh bench cluster`: one pipeline's concurrent runs on one worker and on two, on a real two-node Ray cluster.

The cluster (bench/local_cluster.py) is a head offering `kvmesh-agent` (the agents) and a second node
offering `kvmesh-worker` (the inference workers), both on this machine. Two sessions share it, side by side:
one with one worker, one with two, each with its own redis-server (its own anchor pool). Each session first
runs 8 queries, one run at a time (the anchor pools fill; routing keeps these on worker-0), then the measured
blocks alternate between the sessions: `runs` runs of the same Pipeline object, `concurrency` at a time
(threads calling session.run), routed by the runtime's own router. Measured queries are ones neither session
has seen (40 distinct ones: 10 countries x 4 phrasings), the same ones for both sessions.

Reported:
- runs_per_min_1_worker / _2_workers: measured runs over the blocks' wall time;
- cross_worker_anchor_hits: anchors used by one worker of the two-worker session that the other recorded,
  counted by the Redis pool itself (RedisStore origins: each worker tags what it records and counts what it
  uses by origin; "used" = the anchors that carried 90% of a match's weight);
- anchor_hit_rate_*: share of measured calls served with KVCOMM-corrected segment KV;
- the CPU bound: the machine's busy share while one worker runs (/proc/stat); with u of the cores busy, a
  second worker can add at most the idle rest, so runs_per_min_2 / runs_per_min_1 <= min(2, 1 / u).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .json_report import save_json
from .local_cluster import LocalCluster, node_with, wait_for_nodes

Json = dict[str, Any]
COUNTRIES = ("Norway", "Japan", "Peru", "Kenya", "Canada", "Italy", "Vietnam", "Chile", "Egypt", "Poland")
ASKS = (  # x COUNTRIES: 40 distinct queries, so that no measured run repeats one seen before
    "I am planning a trip to {c}. What is the capital city of {c}?",
    "My sister moves to {c} next month. Which city is the capital of {c}?",
    "For a school quiz about {c}: name the capital of {c}.",
    "We are writing a guide to {c}. What is its capital city?",
)
WARMUP_RUNS = 8


def _log(text: str) -> None:
    print(f"[bench cluster] {text}", file=sys.stderr, flush=True)


def travel_pipeline(scale: float = 1.0) -> Any:
    from kvmesh import Agent, Pipeline

    return Pipeline(
        "travel",
        [
            Agent(
                "researcher",
                "Write one sentence about the country in this request.\n\n{query}",
                max_tokens=max(2, round(20 * scale)),
                reuse="kvcomm",  # what this bench measures: anchors one worker records, another reuses
            ),
            Agent(
                "answerer",
                "Request: {query}\n\nNotes:\n{researcher}\n\nAnswer in one sentence.",
                max_tokens=max(2, round(12 * scale)),
                reuse="kvcomm",
            ),
        ],
    )


def queries() -> list[str]:
    """Every query once, ask by ask: the first WARMUP_RUNS warm the pools, the measured blocks take the rest.
    Fresh queries matter: a repeated one is served from the exact prefix cache and the suffix trees."""
    return [ask.format(c=c) for ask in ASKS for c in COUNTRIES]


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _process_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_block(session: Any, pipeline: Any, prompts: list[str], concurrency: int) -> Json:
    """Run the prompts `concurrency` at a time; wall time, calls, and what the CPUs did meanwhile."""
    import ray

    pids = {name: ray.get(handle.pid.remote()) for name, handle in session.workers.items()}
    busy0, total0 = _cpu_ticks()
    worker0 = {name: _process_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda q: session.run(pipeline, q), prompts))
    wall = time.perf_counter() - started
    busy1, total1 = _cpu_ticks()
    return {
        "runs": len(results),
        "wall_s": wall,
        "calls": [c.stats for r in results for c in r.calls],
        "machine_busy_share": (busy1 - busy0) / max(1, total1 - total0),
        "worker_cores": {name: (_process_seconds(pid) - worker0[name]) / wall for name, pid in pids.items()},
    }


def summarize(session: Any, blocks: list[Json]) -> Json:
    import ray

    names = {ray.get(handle.ready.remote()): name for name, handle in session.workers.items()}
    calls = [c for b in blocks for c in b["calls"]]
    runs, wall = sum(b["runs"] for b in blocks), sum(b["wall_s"] for b in blocks)
    kvcomm = [c for c in calls if "kvcomm" in " ".join(c.segment_modes.values())]
    per_worker: dict[str, Json] = {}
    for address, name in names.items():
        mine = [c for c in calls if c.worker == address]
        hits = [c for c in kvcomm if c.worker == address]
        per_worker[name] = {"calls": len(mine), "kvcomm_calls": len(hits)}
    return {
        "workers": len(session.workers),
        "runs": runs,
        "wall_s": wall,
        "runs_per_min": 60 * runs / wall,
        "block_runs_per_min": [60 * b["runs"] / b["wall_s"] for b in blocks],
        "anchor_hit_rate": len(kvcomm) / max(1, len(calls)),
        "reuse_modes": {m: sum(c.reuse_mode == m for c in calls) for m in sorted({c.reuse_mode for c in calls})},
        "per_worker": per_worker,
        "machine_busy_share": sum(b["machine_busy_share"] * b["wall_s"] for b in blocks) / wall,
        "worker_cores": {n: sum(b["worker_cores"][n] * b["wall_s"] for b in blocks) / wall for n in session.workers},
    }


def anchor_uses(session: Any) -> dict[str, dict[str, int]]:
    """consumer worker -> {origin worker: anchors of that origin it used}, from the session's Redis pool."""
    from kvmesh.kvcomm.redis_store import RedisStore

    pool = RedisStore(session.config.redis_url)
    return {name: pool.used_by(name) for name in session.workers}


def run_cluster_bench(args: argparse.Namespace) -> int:
    import ray

    from kvmesh.runtime import Session
    from kvmesh.runtime.cluster import connect
    from kvmesh.runtime.placement import AGENT_RESOURCE, WORKER_RESOURCE

    quick = bool(args.quick)
    concurrency = args.concurrency or (4 if quick else 8)
    runs = args.runs or (6 if quick else 16)
    if concurrency < 1 or runs < 1:
        raise ValueError(f"--concurrency and --runs must be >= 1, got {concurrency} and {runs}")
    blocks = 1 if quick else 2
    pipeline, prompts = travel_pipeline(0.5 if quick else 1.0), queries()
    started = time.perf_counter()
    with LocalCluster() as cluster:
        address = cluster.start_head(num_cpus=1, resources={AGENT_RESOURCE: 8})
        cluster.add_node(num_cpus=2, resources={WORKER_RESOURCE: 3}, name="workers")  # 1 + 2 workers
        os.environ.update(cluster.driver_env())  # this process joins it: Ray reads its token from there
        connect(address)
        nodes = wait_for_nodes(2)
        _log(
            f"cluster up at {address}: agents on {node_with(AGENT_RESOURCE, nodes)[:8]}, workers on "
            f"{node_with(WORKER_RESOURCE, nodes)[:8]}; starting 1 + 2 workers …"
        )
        with Session(workers=1, address=address) as one, Session(workers=2, address=address) as two:
            sessions = {1: one, 2: two}
            ready_s = time.perf_counter() - started
            warmup, fresh = prompts[:WARMUP_RUNS], prompts[WARMUP_RUNS:]
            for n, session in sessions.items():
                _log(f"{n} worker(s): warm-up, {len(warmup)} runs one at a time …")
                for prompt in warmup:
                    session.run(pipeline, prompt)
            measured: dict[int, list[Json]] = {1: [], 2: []}
            for block in range(blocks):
                for n, session in sessions.items():  # alternating: a noisy minute hits both alike
                    batch = [fresh[(block * runs + i) % len(fresh)] for i in range(runs)]  # the same in both
                    measured[n].append(measure_block(session, pipeline, batch, concurrency))
                    last = measured[n][-1]
                    _log(
                        f"block {block + 1}, {n} worker(s): {last['runs']} runs in {last['wall_s']:.1f} s, "
                        f"machine {last['machine_busy_share']:.0%} busy"
                    )
            summary = {n: summarize(sessions[n], measured[n]) for n in sessions}
            uses = anchor_uses(two)
        ray.shutdown()  # before the cluster goes: a driver whose GCS vanishes is killed after a while
    report = _report(summary, uses, concurrency, runs, blocks, ready_s, quick)
    report["wall_s"] = time.perf_counter() - started
    _print(report)
    save_json(args.json_path, report, _log)
    return 0


def _report(
    summary: dict[int, Json],
    uses: dict[str, dict[str, int]],
    concurrency: int,
    runs: int,
    blocks: int,
    ready_s: float,
    quick: bool,
) -> Json:
    one, two = summary[1], summary[2]
    busy = one["machine_busy_share"]
    cross = {f"{origin}->{user}": n for user, by in uses.items() for origin, n in by.items() if origin != user}
    return {
        "runs_per_min_1_worker": one["runs_per_min"],
        "runs_per_min_2_workers": two["runs_per_min"],
        "scaling_ratio": two["runs_per_min"] / one["runs_per_min"],
        "scaling_bound_cpu": min(2.0, 1.0 / busy) if busy > 0 else 2.0,
        "machine_busy_share_1_worker": busy,
        "machine_busy_share_2_workers": two["machine_busy_share"],
        "cross_worker_anchor_hits": sum(cross.values()),
        "cross_worker_anchor_hits_by_pair": cross,
        "anchor_uses_by_origin": uses,
        "anchor_hit_rate_1_worker": one["anchor_hit_rate"],
        "anchor_hit_rate_2_workers": two["anchor_hit_rate"],
        "sessions": {"1_worker": one, "2_workers": two},
        "setting": {
            "concurrency": concurrency,
            "runs_per_block": runs,
            "blocks": blocks,
            "queries": len(COUNTRIES) * len(ASKS),
            "warmup_runs": WARMUP_RUNS,
            "pipeline": "researcher (20 tokens) -> answerer (12 tokens)" + (" x0.5" if quick else ""),
            "ready_s": ready_s,
        },
        "definitions": DEFINITIONS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "quick": quick,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        },
    }


DEFINITIONS = {
    "runs_per_min": "measured runs / their blocks' wall time (warm-up excluded); the same Pipeline object, "
    "`concurrency` threads calling session.run",
    "cross_worker_anchor_hits": "anchors the two-worker session's workers used that the other worker had recorded, "
    "from the Redis pool's own counters (warm-up included)",
    "anchor_hit_rate": "share of measured calls with at least one segment served by KVCOMM",
    "scaling_bound_cpu": "min(2, 1 / machine_busy_share_1_worker): the idle share of the cores is all a second "
    "worker can add",
    "worker_cores": "CPU seconds of each worker process / wall time (cores it kept busy)",
}


def _print(report: Json) -> None:
    print("                      runs/min   anchor hits   machine busy   calls per worker")
    for n, key in ((1, "1_worker"), (2, "2_workers")):
        s = report["sessions"][key]
        per = ", ".join(f"{w} {v['calls']}" for w, v in s["per_worker"].items())
        print(
            f"  {n} worker(s)         {s['runs_per_min']:8.1f}   {s['anchor_hit_rate']:11.0%}   "
            f"{s['machine_busy_share']:12.0%}   {per}"
        )
    print(
        f"\nscaling {report['scaling_ratio']:.2f}x (CPU bound on {report['machine']['cpus']} cores: "
        f"{report['scaling_bound_cpu']:.2f}x); cross-worker anchor hits: {report['cross_worker_anchor_hits']} "
        f"{report['cross_worker_anchor_hits_by_pair']}"
    )
