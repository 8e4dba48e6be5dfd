"""Connecting to Ray: an embedded local cluster by default, an existing one by `address=` or RAY_ADDRESS.

The embedded cluster is private to this process: it is always a new one (never a `ray start` cluster that
happens to run on this machine), every server of it (GCS, raylet, workers, agents) listens on 127.0.0.1 only,
and Ray's token authentication is on with a token generated for it (RAY_AUTH_TOKEN in this process's
environment, which Ray's processes inherit; never on a command line), so other local users' drivers are
refused too. It is quiet (no dashboard, actors' logs stay in Ray's log
files, warnings only) and shut down at exit. A cluster kvmesh did not start (address=, RAY_ADDRESS) is joined
as it is: kvmesh never changes its authentication settings. A Ray already initialized in this process (by
the user, or an earlier Session) is reused as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .registry import NAMESPACE

# Many processes share few cores: an OpenMP thread that spins while waiting starves the others
# (measured 10-40x slowdowns on 2 cores). Every actor runs with this environment.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# An inference worker is the one that computes: its OpenMP threads wait at each parallel region's barrier as
# libgomp does by default, spinning briefly (GOMP_SPINCOUNT overrides PASSIVE's zero) instead of sleeping and
# waking thousands of times a prefill. With Ray's worker niceness at 0 (below) a Session's dense prefill went
# from ~1.21x an in-process engine's time to ~1.13x (bench/NOTES.md, prefill parity).
WORKER_ENV = {**ACTOR_ENV, "GOMP_SPINCOUNT": "300000"}
# Ray starts its worker processes at niceness 15 by default, below the driver's 0: on a small machine every
# waking nice-0 thread (the driver, Ray's own) then preempts the worker's compute threads. The embedded cluster
# is this user's own: its workers run at the driver's priority.
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0}

_lock = threading.Lock()
_saved_env: dict[str, str | None] = {}
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
            with _keeping_sigterm():
                if address:
                    with _loopback_only() if _listens_on_loopback_only(address) else contextlib.nullcontext():
                        ray.init(address=address, **common)
                else:
                    _require_token_auth()
                    # "local": a new cluster of our own even when `ray start` left one running here
                    with _loopback_only():
                        ray.init(
                            address="local", include_dashboard=False, _system_config=EMBEDDED_SYSTEM_CONFIG, **common
                        )
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


@contextlib.contextmanager
def _keeping_sigterm() -> Iterator[None]:
    """ray.init replaces the process's SIGTERM handler with one that dumps stacks and exits; the caller's
    (e.g. the CLI's clean cancel) is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _require_token_auth() -> None:
    """Token auth for the embedded cluster, with a token of its own, unless the user chose otherwise."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":  # the user's explicit choice: respected, but said out loud
        print(
            "kvmesh: RAY_AUTH_MODE=disabled: the embedded Ray cluster accepts drivers without a token from any "
            "machine that can reach this one",
            file=sys.stderr,
        )
        return
    _set_env("RAY_AUTH_MODE", "token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _set_env("RAY_AUTH_TOKEN", secrets.token_hex(32))
    _reload_ray_auth()


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's servers bind to the node's address, and on Linux Ray turns a loopback node address into the
    outward one, unless it runs in its single-machine mode (its default on macOS and Windows; on Linux,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 read at `import ray`). The mode's constant is switched for the start
    alone: Ray's processes get 127.0.0.1 on their command lines, and the variable stays out of the environment,
    where it would stop a child process from starting a multi-node cluster of its own."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _listens_on_loopback_only(address: str) -> bool:
    """A GCS at a loopback address that the machine's outward address does not reach (another kvmesh
    session's embedded cluster): Ray must then not turn 127.0.0.1 into the outward address to dial it."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # sends nothing: picks the outbound interface's address
            outward = probe.getsockname()[0]
        socket.create_connection((outward, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def _reload_ray_auth() -> None:
    """Ray's C++ side read RAY_AUTH_MODE and the token when ray was imported, and would go on connecting
    without one: have it read them again (as Ray does when it turns token auth on itself)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing to reload
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _set_env(name: str, value: str) -> None:
    """Set for the embedded cluster's lifetime: shutdown() puts back what was there (a later connect to
    another cluster must not carry this one's token)."""
    _saved_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def shutdown() -> None:
    """Stop the embedded cluster, if this process started it; leave anyone else's alone."""
    global _started_here
    import ray

    with _lock:
        if _started_here and ray.is_initialized():
            ray.shutdown()
        _started_here = False
        for name, value in _saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if _saved_env:
            _reload_ray_auth()
        _saved_env.clear()
