"""A worker as a Ray actor: loads the engine, serves WorkerService over gRPC, registers its address.

Created with max_restarts (Ray restarts it after a crash, re-running __init__: a fresh engine, a new
port, a new registration). Its Ray methods are for lifecycle and traces only; LLM calls arrive over gRPC.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import ray

from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.kvcomm.store import MemoryStore, Store
from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine_loop import EngineLoop
from kvmesh.workers.worker import build_worker

from .config import RuntimeConfig
from .grpc_server import start_server
from .registry import NAMESPACE, registry_name
from .tracing import TracedActor, install, tracer
from .worker_service import WorkerServicer

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


def model_label(spec: str) -> str:
    """How CallStats name the model: the spec for a bundled one, the file or folder name for a path."""
    return Path(spec).name if ("/" in spec or spec.endswith(".gguf")) else spec


class WorkerActor(TracedActor):
    def __init__(self, name: str, session_id: str, config: RuntimeConfig, threads: int) -> None:
        """`threads`: torch's CPU threads, also in the process's OMP_NUM_THREADS (set by the session, so
        every thread of the process uses them: torch keeps the setting per thread)."""
        self.name = name
        install(config, name)
        worker = build_worker(replace(config.worker, threads=threads), kv_store(config, name))
        self.loop = EngineLoop(worker.engine)
        self.planner = worker.planner
        self._address = ""
        label = model_label(config.worker.model)
        servicer = WorkerServicer(self.loop, self.planner, label, lambda: self._address, tracer(config))
        self.server = start_server(
            config,
            {WORKER_SERVICE: lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)},
            name,
        )
        self._address = self.server.address
        registry = ray.get_actor(registry_name(session_id), namespace=NAMESPACE)
        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        ray.get(
            registry.register_worker.remote(
                name, self._address, label, context.current_actor, context.get_node_id(), node_ip
            )
        )

    def ready(self) -> str:
        """The worker's gRPC address; returns once __init__ is done (after a restart, the new one)."""
        return self._address

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this worker runs on (tests and benchmarks check placement with it)."""
        return ray.get_runtime_context().get_node_id()


def kv_store(config: RuntimeConfig, worker: str) -> Store:
    """The worker's view of KVCOMM's store: Redis when the session has one (its records sealed with the session's
    store secret), else its own memory. The worker's name tags the anchors it records, so the pool counts which
    worker's anchors each worker reuses."""
    if config.redis_url is None or config.redis_url == "memory":
        return MemoryStore(config.kv_pool)
    # unreachable Redis is survivable: calls then run dense, with a warning
    return RedisStore(config.redis_url, config.kv_pool, secret=config.store_secret, origin=worker)
