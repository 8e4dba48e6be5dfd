"""RuntimeConfig: how the runtime's gRPC servers bind and secure themselves, deadlines and actor sizes.

Defaults come from the environment where one is named (KVMESH_HOST, KVMESH_TOKEN, KVMESH_TLS_CERT,
KVMESH_TLS_KEY, KVMESH_TLS_CA, KVMESH_MAX_MESSAGE_MB, KVMESH_REDIS_URL, KVMESH_STORE_SECRET, KVMESH_TRACE, the
workers' KVMESH_MODEL and KVMESH_WORKER_{DEVICE,WEIGHTS,THREADS}, the placements'
KVMESH_{WORKER,AGENT}_{CPUS,GPUS,MEMORY_MB,RESOURCES}), so a cluster can be configured without code; every
variable is listed in env_vars.py. The config is pickled into every actor: all servers of a session share one
token and one TLS setting, and every process traces alike (the driver's OTEL_* settings travel in `trace_env`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.agents import Placement
from kvmesh.kvcomm.record_seal import check_secret
from kvmesh.kvcomm.redis_store import redact_url
from kvmesh.kvcomm.store import PoolConfig
from kvmesh.workers.worker import WorkerConfig


class InsecureTransportWarning(UserWarning):
    """A secret or user data would cross the network unencrypted."""


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
TRACE_EXPORTERS = ("console", "otlp", "memory")  # KVMESH_TRACE: "off", or one or more of these, comma-separated


class ConfigError(ValueError):
    """A runtime setting that cannot work; the message names the setting and the fix."""


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _env_mb(name: str, default_mb: int) -> int:
    raw = _env(name)
    try:
        return int(float(raw) * (1 << 20)) if raw else default_mb << 20
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of megabytes") from None


def _env_float(name: str) -> float | None:
    raw = _env(name)
    try:
        return float(raw) if raw else None
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _env_placement(cpus: str, gpus: str, memory_mb: str, resources: str) -> Placement:
    """A Placement from four variables (unset: None, the default decides); errors name the variable."""
    raw = _env(resources)
    try:
        parsed = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise ConfigError(f"{resources}={raw!r} is not JSON; give an object, e.g. '{{\"kvmesh-worker\": 1}}'") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise ConfigError(f"{resources}={raw!r}: give a JSON object of resource name -> amount")
    memory = _env(memory_mb)
    try:
        return Placement(
            num_cpus=_env_float(cpus),
            num_gpus=_env_float(gpus),
            memory_bytes=_env_mb(memory_mb, 0) if memory else None,
            resources=parsed,
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{cpus} / {gpus} / {memory_mb} / {resources}: {exc}") from None


def _worker_placement() -> Placement:
    return _env_placement(
        "KVMESH_WORKER_CPUS", "KVMESH_WORKER_GPUS", "KVMESH_WORKER_MEMORY_MB", "KVMESH_WORKER_RESOURCES"
    )


def _agent_placement() -> Placement:
    return _env_placement("KVMESH_AGENT_CPUS", "KVMESH_AGENT_GPUS", "KVMESH_AGENT_MEMORY_MB", "KVMESH_AGENT_RESOURCES")


def _worker_config() -> WorkerConfig:
    """The workers' settings from KVMESH_MODEL and KVMESH_WORKER_{DEVICE,WEIGHTS,THREADS}; errors name the variable."""
    threads = _env("KVMESH_WORKER_THREADS")
    if threads is not None and not threads.isdigit():
        raise ConfigError(f"KVMESH_WORKER_THREADS={threads!r}: give a number of threads >= 1")
    try:
        return WorkerConfig(
            model=_env("KVMESH_MODEL") or WorkerConfig.model,
            device=_env("KVMESH_WORKER_DEVICE"),
            weights=_env("KVMESH_WORKER_WEIGHTS"),  # type: ignore[arg-type]  # validated by WorkerConfig
            threads=int(threads) if threads else None,
        )
    except ValueError as exc:
        raise ConfigError(f"KVMESH_MODEL / KVMESH_WORKER_DEVICE / KVMESH_WORKER_WEIGHTS / THREADS: {exc}") from None


def _otel_env() -> tuple[tuple[str, str], ...]:
    """The standard OpenTelemetry settings of this process (endpoint, headers, service name, batching)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OTEL_")))


def parse_trace(value: str) -> frozenset[str]:
    """KVMESH_TRACE as a set of exporters: "off" (or empty) is none; "otlp,memory" is two."""
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    if names <= {"off", "none"}:
        return frozenset()
    unknown = names - set(TRACE_EXPORTERS)
    if unknown:
        raise ConfigError(
            f"KVMESH_TRACE / RuntimeConfig.trace={value!r}: unknown exporter(s) {', '.join(sorted(unknown))}; "
            f"use 'off' or a comma-separated choice of {', '.join(TRACE_EXPORTERS)}"
        )
    return frozenset(names)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


@dataclass(frozen=True)
class RuntimeConfig:
    # gRPC: every server binds `host` on a free port and registers the address it can be reached at
    host: str = field(default_factory=lambda: _env("KVMESH_HOST") or "127.0.0.1")
    token: str | None = field(default_factory=lambda: _env("KVMESH_TOKEN"), repr=False)  # required off loopback
    tls_cert: str | None = field(default_factory=lambda: _env("KVMESH_TLS_CERT"))  # server cert (PEM)
    tls_key: str | None = field(default_factory=lambda: _env("KVMESH_TLS_KEY"))  # its private key (PEM)
    tls_ca: str | None = field(default_factory=lambda: _env("KVMESH_TLS_CA"))  # what clients trust (PEM)
    # the name clients expect in the servers' cert instead of each address's host: one cert for every node
    tls_server_name: str | None = field(default_factory=lambda: _env("KVMESH_TLS_SERVER_NAME"))
    max_message_bytes: int = field(default_factory=lambda: _env_mb("KVMESH_MAX_MESSAGE_MB", 16))
    call_deadline_s: float = 30.0  # every unary call (messages between agents and the driver, stats)
    generate_deadline_s: float = 600.0  # one LLM call, queueing included
    server_threads: int = 16  # handler threads per server (a worker's Generate holds one while it streams)
    max_concurrent_rpcs: int = 256  # per server, running or queued for a thread; beyond: RESOURCE_EXHAUSTED
    # where actors run (placement.py resolves them): what each worker and, by default, each agent asks Ray
    # for; fields left None take the built-in defaults (workers: 0.5 CPU, 1 GiB, a GPU on a GPU cluster, the
    # kvmesh-worker resource where nodes offer it). Ray's CPU accounting only packs actors: a CPU worker's
    # torch uses the cores it finds. A pipeline's own agent_placement wins over agent_placement here.
    worker_placement: Placement | Mapping[str, Any] = field(default_factory=_worker_placement)
    agent_placement: Placement | Mapping[str, Any] = field(default_factory=_agent_placement)
    # an actor up and serving (a worker loads its model first; an autoscaler may be adding its node)
    startup_timeout_s: float = field(default_factory=lambda: _env_float("KVMESH_STARTUP_TIMEOUT_S") or 180.0)
    # what every inference worker runs: model, device, weight format, threads (None: the cores of its node
    # shared among the session's workers there), engine budgets, speculation, match and blend settings
    worker: WorkerConfig = field(default_factory=_worker_config)
    # where KVCOMM's anchors and segment KVs live, shared by the workers: a redis:// URL; None: the session
    # starts a private redis-server for itself; "memory": each worker keeps its own (nothing shared).
    # repr=False: the URL may carry the Redis password (the private server's always does)
    redis_url: str | None = field(default_factory=lambda: _env("KVMESH_REDIS_URL"), repr=False)
    # the HMAC key of every record the workers store (kvcomm/record_seal.py); None: the session derives it from
    # the token (sessions sharing a token share a Redis pool) or makes one
    store_secret: str | None = field(default_factory=lambda: _env("KVMESH_STORE_SECRET"), repr=False)
    kv_pool: PoolConfig = field(default_factory=PoolConfig)  # anchors per slot, byte budgets, per-record cap
    redis_max_memory_bytes: int = 1 << 30  # the private redis-server's maxmemory (least recently used go first)
    worker_restart_timeout_s: float = 120.0  # how long an agent waits for Ray to restart a crashed worker
    # tracing (see tracing.py): which exporters every process of the session uses, and the OTEL_* settings
    # they read (the OTLP endpoint, headers, service name); repr=False: headers may hold an API key
    trace: str = field(default_factory=lambda: _env("KVMESH_TRACE") or "off")
    trace_env: tuple[tuple[str, str], ...] = field(default_factory=_otel_env, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("RuntimeConfig.host is empty; use 127.0.0.1 (default) or an interface address")
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"binding gRPC servers to {self.host!r} (not loopback) requires a shared token: "
                "set KVMESH_TOKEN (or RuntimeConfig.token) on every node; add TLS with KVMESH_TLS_CERT/KEY/CA"
            )
        if not is_loopback(self.host) and not self.tls_cert:
            warnings.warn(
                f"gRPC servers bind {self.host!r} (not loopback) without TLS: the session token and every message "
                "cross the network in clear; set KVMESH_TLS_CERT/KEY/CA to encrypt them",
                InsecureTransportWarning,
                stacklevel=3,
            )
        if self.token is not None and (not self.token.isprintable() or not self.token.strip()):
            raise ConfigError("RuntimeConfig.token must be non-empty printable text (it travels in gRPC metadata)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate and its key (KVMESH_TLS_CERT and KVMESH_TLS_KEY)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"RuntimeConfig.{name}: {path!r} is not a file (PEM expected)")
        if self.tls_cert and not self.tls_ca:
            raise ConfigError("with TLS on, clients need the CA that signed the servers' cert: set KVMESH_TLS_CA")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        for name in ("call_deadline_s", "generate_deadline_s", "startup_timeout_s", "worker_restart_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"RuntimeConfig.{name} must be a positive number of seconds, got {value!r}")
        if self.redis_url not in (None, "memory") and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"KVMESH_REDIS_URL={redact_url(self.redis_url)!r}: give redis://host:port[/db], 'memory', or leave it "
                "unset (kvmesh then starts a local redis-server)"
            )
        if self.store_secret is not None:
            try:
                check_secret(self.store_secret)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not isinstance(self.kv_pool, PoolConfig):
            raise ConfigError(f"RuntimeConfig.kv_pool must be a kvmesh PoolConfig, got {type(self.kv_pool).__name__}")
        if not isinstance(self.redis_max_memory_bytes, int) or self.redis_max_memory_bytes < 1 << 20:
            raise ConfigError(
                f"RuntimeConfig.redis_max_memory_bytes must be an int >= 1 MiB, got {self.redis_max_memory_bytes!r}"
            )
        if self.server_threads < 2:
            raise ConfigError(f"server_threads must be >= 2, got {self.server_threads}")
        if self.max_concurrent_rpcs < self.server_threads:
            raise ConfigError(
                f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must be >= server_threads ({self.server_threads})"
            )
        for name in ("worker_placement", "agent_placement"):  # a Placement, or a plain dict of its fields
            try:
                placement = Placement.of(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"RuntimeConfig.{name}: {exc}") from None
            if placement is None:
                raise ConfigError(f"RuntimeConfig.{name} must be a kvmesh Placement (Placement() for the defaults)")
            object.__setattr__(self, name, placement)
        if not isinstance(self.worker, WorkerConfig):
            raise ConfigError(f"RuntimeConfig.worker must be a kvmesh WorkerConfig, got {type(self.worker).__name__}")
        parse_trace(self.trace)
        if not all(isinstance(kv, tuple) and len(kv) == 2 and kv[0].startswith("OTEL_") for kv in self.trace_env):
            raise ConfigError("RuntimeConfig.trace_env must be (name, value) pairs of OTEL_* variables")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def trace_exporters(self) -> frozenset[str]:
        return parse_trace(self.trace)

    def read(self, name: str) -> bytes | None:
        """The bytes of a TLS file setting ('tls_cert', 'tls_key', 'tls_ca'), or None when unset."""
        path = getattr(self, name)
        return Path(path).read_bytes() if path else None
