"""kvmesh on a real multi-node Ray cluster on this machine: `ray start --head` offering kvmesh-agent, a
second node joined to it offering kvmesh-worker, and the session's own redis-server.

The cluster runs in private process groups (bench/local_cluster.py) and the driver in a subprocess
(tests/cluster_scenario.py): neither disturbs the embedded Ray the rest of the suite shares, and the
cluster is torn down by its process groups even when the test fails (never `ray stop`, which would stop
every Ray of the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.bench.local_cluster import RAY_ENV, LocalCluster
from kvmesh.runtime.placement import AGENT_RESOURCE, AGENT_UNITS, WORKER_RESOURCE, WORKER_UNITS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster():
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1, resources={AGENT_RESOURCE: 8})
        worker_node = cluster.add_node(num_cpus=1, resources={WORKER_RESOURCE: 2}, name="workers")
        yield cluster, worker_node


def test_a_pipeline_on_two_nodes_shares_anchors_across_workers_and_names_a_lost_node(cluster, tmp_path):
    local, worker_node = cluster
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_ENV | local.driver_env()
    command = [sys.executable, str(ROOT / "tests" / "cluster_scenario.py"), local.address, str(worker_node.pgid)]
    done = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=300, env=env, check=False)
    logs = "\n".join(f"--- {n.name} ---\n{local.log(n)[-1500:]}" for n in local.nodes)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n{logs}"
    report = json.loads(out.read_text())

    # placement by the defaults alone: the cluster offers the two resources, so the actors ask for them
    assert report["worker_options"]["resources"] == {WORKER_RESOURCE: WORKER_UNITS}
    assert report["worker_options"]["num_gpus"] == 0  # no GPU in this cluster
    assert report["agent_options"]["resources"] == {AGENT_RESOURCE: AGENT_UNITS}
    assert set(report["worker_nodes"].values()) == {report["nodes"]["worker"]}
    assert set(report["agent_nodes"].values()) == {report["nodes"]["agent"]}

    # the anchor pool is shared through Redis: worker-1 reuses what worker-0 recorded
    addresses = report["worker_addresses"]
    first, second, third = report["runs"]
    assert {c["worker"] for c in first["calls"] + second["calls"]} == {addresses["worker-0"]}
    assert {c["reuse_mode"] for c in first["calls"]} <= {"prefix", "dense"}  # cold pools: these record anchors
    assert {c["worker"] for c in third["calls"]} == {addresses["worker-1"]}  # worker-0 drained
    answerer = next(c for c in third["calls"] if c["agent"] == "answerer")
    assert answerer["reuse_mode"] == "kvcomm" and answerer["reused_tokens"] > 0, third["calls"]
    assert answerer["anchors_consulted"] >= 4 and set(answerer["segment_modes"].values()) == {"kvcomm"}
    assert third["outputs"] == first["outputs"]  # the same anchors restore the same KV: the same reply
    assert report["used_by"]["worker-1"].get("worker-0", 0) >= 2, report["used_by"]  # counted by the pool itself
    assert "worker-1" not in report["used_by"]["worker-1"]  # worker-1 recorded none of the anchors it used

    # the worker node dies mid-run: a clear error naming the worker and its node; nothing completed is lost
    failure = report["failure"]
    assert failure is not None and failure["type"] == "AgentError", report
    # on a miss, the agent's own log (its traceback, forwarded to the driver's stderr) says where the error arose
    assert "agent 'teller'" in failure["message"] and "worker 'worker-1' died" in failure["message"], (
        f"{failure}\n{done.stderr[-6000:]}"
    )
    assert "left the cluster" in failure["message"] or "not back within 25 s" in failure["message"], failure
    assert report["error_after_s"] < 60
    assert report["completed_intact"] and report["agents_alive"]
    assert report["after"] is not None and "no workers are registered" in report["after"]["message"], report
