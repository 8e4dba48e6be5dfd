"""The driver of tests/test_cluster.py, run as a process of its own against the LocalCluster the test started.

Why a subprocess: a process holds one Ray connection at a time, and the test session's embedded Ray
(conftest's ray_cluster) may be up already; this driver connects to the multi-node cluster instead, and
reports what it saw as JSON, so that the test process never touches Ray.

    python tests/cluster_scenario.py ADDRESS WORKER_NODE_PGID OUT.json

1. placement: two workers (on the node offering kvmesh-worker) and a pipeline's agents (on the node
   offering kvmesh-agent), by the defaults alone;
2. the anchor pool shared through Redis: two runs on worker-0 record anchors; worker-0 is then drained
   (registry.remove_worker: what the runtime does to a worker that died for good), so a third run lands
   on worker-1, which has recorded nothing, and reuses worker-0's anchors;
3. the worker node is killed (its process group: raylet, workers) at the first token of another run: the
   user gets an error naming the worker and its lost node; completed results stay as they were.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import ray

from kvmesh import Agent, Pipeline
from kvmesh.bench.local_cluster import node_with, wait_for_nodes
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.runtime import RuntimeConfig, Session, Token
from kvmesh.runtime.cluster import connect
from kvmesh.runtime.placement import AGENT_RESOURCE, WORKER_RESOURCE

QUERY = "I am planning a trip to Norway. What is the capital city of Norway?"
TRAVEL = Pipeline(
    "travel",
    [
        Agent(
            "researcher",
            "Write one sentence about the country in this request.\n\n{query}",
            max_tokens=20,
            reuse="kvcomm",
        ),
        Agent(
            "answerer",
            "Request: {query}\n\nNotes:\n{researcher}\n\nAnswer in one sentence.",
            max_tokens=12,
            reuse="kvcomm",
        ),
    ],
)
STORY = Pipeline("story", [Agent("teller", "Tell a long story about {query}.", max_tokens=64)])


def snapshot(result) -> dict:
    return {"outputs": dict(result.outputs), "calls": [c.as_json() for c in result.calls]}


def main(address: str, worker_pgid: int, out: str) -> None:
    report: dict = {}
    started = time.perf_counter()
    connect(address)
    nodes = wait_for_nodes(2)  # before the session: its placement defaults look at what the cluster offers
    report["nodes"] = {"worker": node_with(WORKER_RESOURCE, nodes), "agent": node_with(AGENT_RESOURCE, nodes)}
    config = RuntimeConfig(worker_restart_timeout_s=25.0)
    with Session(workers=2, address=address, config=config) as session:
        report["ready_s"] = time.perf_counter() - started
        report["worker_options"] = session.worker_options.ray_options()
        report["agent_options"] = session.agent_options(TRAVEL).ray_options()
        report["worker_nodes"] = {n: ray.get(h.node_id.remote()) for n, h in session.workers.items()}
        report["agent_nodes"] = {n: ray.get(h.node_id.remote()) for n, h in session.agent_actors(TRAVEL).items()}
        addresses = {n: ray.get(h.ready.remote()) for n, h in session.workers.items()}
        report["worker_addresses"] = addresses

        runs = [session.run(TRAVEL, QUERY) for _ in range(2)]  # both on worker-0: least loaded, then affinity
        ray.get(session.registry.remove_worker.remote("worker-0"))  # drained: nothing more is routed to it
        runs.append(session.run(TRAVEL, QUERY))
        completed = [snapshot(r) for r in runs]
        report["runs"] = completed
        pool = RedisStore(session.config.redis_url)  # the workers' pool, as its counters tell who used whose anchors
        report["used_by"] = {name: pool.used_by(name) for name in session.workers}

        kill_at = None
        try:
            for event in session.stream(STORY, "a lighthouse keeper"):
                if isinstance(event, Token) and kill_at is None:
                    os.killpg(worker_pgid, signal.SIGKILL)  # the worker node dies as a machine would
                    kill_at = time.perf_counter()
            report["failure"] = None
        except Exception as exc:
            report["failure"] = {"type": type(exc).__name__, "message": str(exc)}
        report["error_after_s"] = time.perf_counter() - kill_at if kill_at else None
        report["completed_intact"] = [snapshot(r) for r in runs] == completed
        agents = session.agent_actors(TRAVEL)
        report["agents_alive"] = all(ray.get(h.ready.remote(), timeout=10) for h in agents.values())
        try:
            session.run(TRAVEL, QUERY, timeout_s=60)
            report["after"] = None
        except Exception as exc:
            report["after"] = {"type": type(exc).__name__, "message": str(exc)}
    report["wall_s"] = time.perf_counter() - started
    with open(out, "w") as file:
        json.dump(report, file, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
