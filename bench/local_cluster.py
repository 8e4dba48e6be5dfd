"""A real multi-node Ray cluster on this machine, for the cluster test and `kvmesh bench cluster`.

    with LocalCluster() as cluster:
        address = cluster.start_head(num_cpus=1, resources={"kvmesh-agent": 8})
        workers = cluster.add_node(num_cpus=1, resources={"kvmesh-worker": 2})
        ...                      # a driver connects with ray.init(address) (or Session(address=...))
        cluster.kill(workers)    # the node dies as a machine would: raylet and everything on it

Each node is `ray start --block` in its own process group, with node address 127.0.0.1, its own ports and a
private temp dir, and Ray's token authentication on with a token generated for this cluster (Ray's gRPC
servers listen on every interface: the token keeps other drivers out); a driver joins with `driver_env()`.
It is stopped by killing those process groups, never by `ray stop`, which stops every Ray process of the
machine: a test session's embedded Ray, or another benchmark's. This process does not connect to the cluster
(it may hold another Ray already): whoever connects checks the nodes joined (`wait_for_nodes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}
_HOST = "127.0.0.1"


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    resources: dict[str, float]

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the group is the `ray start` process's own


class LocalCluster:
    def __init__(self, root: str | None = None) -> None:
        # short: Ray's unix sockets live below it, and socket paths are limited to ~107 bytes
        self.root = Path(root or tempfile.mkdtemp(prefix="kvr-"))
        self.address = ""
        self.nodes: list[Node] = []
        self._token = secrets.token_hex(32)

    def driver_env(self) -> dict[str, str]:
        """What a process needs in its environment to join this cluster (Ray reads the token from there)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self._token}

    def start_head(self, num_cpus: float, resources: Mapping[str, float]) -> str:
        port = _free_port()
        self.address = f"{_HOST}:{port}"
        head = ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={_free_port()}"]
        self._start("head", num_cpus, resources, head)
        return self.address

    def add_node(self, num_cpus: float, resources: Mapping[str, float], name: str | None = None) -> Node:
        if not self.address:
            raise RuntimeError("start the head first")
        return self._start(name or f"node-{len(self.nodes)}", num_cpus, resources, [f"--address={self.address}"])

    def _start(self, name: str, num_cpus: float, resources: Mapping[str, float], extra: list[str]) -> Node:
        ray = str(Path(sys.executable).with_name("ray"))
        # every port of its own: the defaults (e.g. the dashboard agent's 52365) would clash between nodes
        ports = {
            port: _free_port()
            for port in (
                "node-manager",
                "object-manager",
                "dashboard-agent-listen",
                "dashboard-agent-grpc",
                "metrics-export",
                "runtime-env-agent",
            )
        }
        command = [
            ray,
            "start",
            "--block",
            f"--node-ip-address={_HOST}",
            f"--num-cpus={num_cpus:g}",
            f"--resources={json.dumps(dict(resources))}",
            f"--temp-dir={self.root}",
            "--disable-usage-stats",
            *(f"--{port}-port={number}" for port, number in ports.items()),
            *extra,
        ]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (the node's lifetime, closed in kill())
        env = os.environ | RAY_ENV | self.driver_env()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = Node(name, process, dict(resources))
        self.nodes.append(node)
        time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"ray start for {name} exited at once: {self.log(node)[-2000:]}")
        return node

    def log(self, node: Node) -> str:
        path = self.root / f"{node.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """The node dies as a machine would: `ray start`, its raylet and every process it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pgid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=10)

    def stop(self) -> None:
        """Every node, workers first; then the temp dir. Safe to call twice."""
        for node in reversed(self.nodes):
            self.kill(node, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM ...
            self.kill(node)  # ... and whatever is left goes with the group
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_nodes(count: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """In a process connected to the cluster (ray.init): wait until `count` nodes are alive; returns them."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= count:
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(alive)} of {count} Ray nodes joined within {timeout_s:.0f} s")
        time.sleep(0.2)


def node_with(resource: str, nodes: list[dict[str, Any]]) -> str:
    """The id of the node that offers `resource` (the one that does, in a LocalCluster)."""
    found = [n["NodeID"] for n in nodes if n["Resources"].get(resource, 0) > 0]
    if len(found) != 1:
        raise ValueError(f"expected one node offering {resource!r}, found {len(found)}")
    return found[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]
