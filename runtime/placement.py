"""Where a session's actors run: Placements (agents/placement.py) resolved into Ray options.

Each field is taken from the first level that says it:
1. the pipeline's `agent_placement` (agents only);
2. the session's RuntimeConfig: `worker_placement`, `agent_placement` (env
   KVMESH_{WORKER,AGENT}_{CPUS,GPUS,MEMORY_MB,RESOURCES}, see config.py);
3. the built-in defaults below, some of which look at the cluster when the session starts:
   - workers reserve 0.5 CPU and 1 GiB, and one GPU each where the cluster has GPUs;
   - a worker asks for one unit of `kvmesh-worker` and an agent for 0.01 of `kvmesh-agent` when some node
     offers that resource (the deploy/ files start GPU nodes with the one and CPU nodes with the other),
     so that on such a cluster workers land on the GPU nodes and agents on the CPU nodes; on a cluster
     whose nodes offer neither (the embedded one, a plain `ray start`), they go anywhere.
The cluster is looked at once, at the session's start: an autoscaling cluster whose GPU nodes are not up
yet should say GPUs and resources explicitly (the deploy/ files do, through the environment).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvmesh.agents import Placement

WORKER_RESOURCE = "kvmesh-worker"  # a node offering N units hosts N workers
AGENT_RESOURCE = "kvmesh-agent"  # ... and 100 N agents
WORKER_UNITS = 1.0
AGENT_UNITS = 0.01
WORKER_DEFAULTS = Placement(num_cpus=0.5, memory_bytes=1 << 30)  # SmolLM2 in fp32 is ~0.6 GB with its caches
AGENT_DEFAULTS = Placement(num_cpus=0.0, num_gpus=0.0)
Kind = Literal["worker", "agent"]


@dataclass(frozen=True)
class ActorOptions:
    """A resolved placement: what every actor of a kind asks Ray for."""

    kind: Kind
    num_cpus: float
    num_gpus: float
    memory_bytes: int | None
    resources: dict[str, float] = field(default_factory=dict)

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.memory_bytes is not None:
            options["memory"] = self.memory_bytes
        return options

    def describe(self) -> str:
        parts = [f"{self.num_cpus:g} CPU"]
        if self.num_gpus:
            parts.append(f"{self.num_gpus:g} GPU")
        if self.memory_bytes is not None:
            parts.append(f"{self.memory_bytes / (1 << 30):.3g} GiB memory")
        parts += [f"{name!r}: {amount:g}" for name, amount in sorted(self.resources.items())]
        return ", ".join(parts)


def resolve(kind: Kind, levels: list[Placement | None], cluster: Mapping[str, float]) -> ActorOptions:
    """The options of an actor of `kind`: the first level that sets a field wins (see the module's doc);
    `cluster` is ray.cluster_resources()."""
    placement = Placement()
    for level in levels:
        if level is not None:
            placement = placement.over(level)  # keeps what an earlier level set
    placement = placement.over(WORKER_DEFAULTS if kind == "worker" else AGENT_DEFAULTS)
    num_gpus = placement.num_gpus
    if num_gpus is None:  # only workers get here: one GPU each where CUDA nodes are in the cluster
        num_gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    resources = placement.resources
    if resources is None:
        name, units = (WORKER_RESOURCE, WORKER_UNITS) if kind == "worker" else (AGENT_RESOURCE, AGENT_UNITS)
        resources = {name: units} if cluster.get(name, 0) > 0 else {}
    assert placement.num_cpus is not None
    return ActorOptions(kind, float(placement.num_cpus), float(num_gpus), placement.memory_bytes, dict(resources))


def worker_threads(options: ActorOptions, count: int, nodes: Sequence[Mapping[str, float]]) -> int:
    """Torch threads per worker by default: the cores of a node that can host workers, shared among the
    `count` workers spread over such nodes. Not Ray's CPU reservation, which only packs actors (Ray would
    give a 0.5-CPU actor OMP_NUM_THREADS=1: one core of many). `nodes`: each alive node's resources."""
    wanted = {**options.resources, **({"GPU": options.num_gpus} if options.num_gpus else {})}
    hosts = [n for n in nodes if all(n.get(name, 0.0) >= amount for name, amount in wanted.items())] or list(nodes)
    if not hosts:
        return 1
    per_node = math.ceil(count / len(hosts))
    cores = min(node.get("CPU", 1.0) for node in hosts)
    return max(1, int(cores // per_node))


def shortfall(options: ActorOptions, count: int, cluster: Mapping[str, float]) -> list[str]:
    """What `count` such actors need beyond everything the cluster has now, e.g. ["2 GPU (the cluster has 1)"]
    (empty: they fit in total; whether they fit on one node each is Ray's to find)."""
    wanted = {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources}
    if options.memory_bytes is not None:
        wanted["memory"] = float(options.memory_bytes)
    missing = []
    for name, amount in wanted.items():
        total, has = amount * count, cluster.get(name, 0.0)
        if total > has + 1e-9:
            if name == "memory":
                missing.append(f"{total / (1 << 30):.3g} GiB memory (the cluster has {has / (1 << 30):.3g})")
            else:
                missing.append(f"{total:g} {name if name in ('CPU', 'GPU') else repr(name)} (the cluster has {has:g})")
    return missing


def warn_if_short(options: ActorOptions, count: int, cluster: Mapping[str, float]) -> None:
    """Say at once when the cluster lacks what the actors ask for: they would wait silently (an autoscaler
    may still add the nodes, so it is a warning; RuntimeConfig.startup_timeout_s ends the wait)."""
    missing = shortfall(options, count, cluster)
    if missing:
        print(
            f"kvmesh: {count} {options.kind} actor(s) ask for {options.describe()} each; the cluster lacks "
            f"{', '.join(missing)}: they wait for nodes that offer it (RuntimeConfig.startup_timeout_s)",
            file=sys.stderr,
        )


def describe_cluster(cluster: Mapping[str, float]) -> str:
    """What a cluster offers, for messages: "'CPU': 2, 'GPU': 1, 'kvmesh-worker': 2, 'memory': 7.7 GiB"."""
    parts = []
    for name, amount in sorted(cluster.items()):
        if name.startswith("node:") or name == "object_store_memory":
            continue  # Ray's per-node markers and the object store say nothing about placement
        parts.append(f"{name!r}: {amount / (1 << 30):.3g} GiB" if name == "memory" else f"{name!r}: {amount:g}")
    return ", ".join(parts)
