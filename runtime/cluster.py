"""Connecting to Ray: an embedded local cluster by default, an existing one by `address=` or RAY_ADDRESS.

The embedded cluster is quiet (no dashboard, actors' logs stay in Ray's log files, warnings only) and
is shut down at exit — only if this process started it. A Ray already initialized in this process
(by the user, or an earlier Session) is reused as it is.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field

from .registry import NAMESPACE

# Many processes share few cores: an OpenMP thread that spins while waiting starves the others
# (measured 10-40x slowdowns on 2 cores). Every actor runs with this environment.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

_lock = threading.Lock()
_started_here = False


@dataclass(frozen=True)
class ClusterInfo:
    address: str  # the GCS address, for `--address` of another driver
    embedded: bool  # started by this process (and shut down at its exit)
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)  # ray.cluster_resources() when connected
    node_ips: tuple[str, ...] = ()  # of the alive nodes: several distinct ones mean several machines
    nodes: tuple[dict[str, float], ...] = ()  # each alive node's resources (CPU, GPU, custom)


def connect(address: str | None = None) -> ClusterInfo:
    global _started_here
    import ray

    with _lock:
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            common = {
                "namespace": NAMESPACE,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
                "runtime_env": {"env_vars": dict(ACTOR_ENV)},
            }
            if address:
                ray.init(address=address, **common)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster
                ray.init(include_dashboard=False, **common)
                _started_here = True
                atexit.register(shutdown)
        context = ray.get_runtime_context()
        resources = {name: float(amount) for name, amount in ray.cluster_resources().items()}
        alive = [node for node in ray.nodes() if node["Alive"]]
        return ClusterInfo(
            address=context.gcs_address,
            embedded=_started_here,
            num_cpus=resources.get("CPU", 0.0),
            resources=resources,
            node_ips=tuple(node["NodeManagerAddress"] for node in alive),
            nodes=tuple({name: float(amount) for name, amount in node["Resources"].items()} for node in alive),
        )


def shutdown() -> None:
    """Stop the embedded cluster, if this process started it; leave anyone else's alone."""
    global _started_here
    import ray

    with _lock:
        if _started_here and ray.is_initialized():
            ray.shutdown()
        _started_here = False
