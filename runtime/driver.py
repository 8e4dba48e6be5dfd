"""Session: Ray, a registry, inference workers and agent actors, kept across runs.

    with Session(workers=1) as session:          # Ray up, model loaded: once
        result = session.run(pipeline, "query")  # agent actors start on a pipeline's first run
        for event in session.stream(pipeline, "another query"): ...

A session pays Ray's start and the model load once; each pipeline's agent actors start on its first
run and stay until the pipeline object is garbage-collected, `release(pipeline)` or `close()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import signal
import sys
import threading
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvmesh.agents import Pipeline
from kvmesh.agents.errors import check_text
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.record_seal import store_secret_for
from kvmesh.v1 import agent_pb2_grpc

from . import portable
from .agent_actor import AGENT_SERVICE, AgentActor
from .cluster import ACTOR_ENV, WORKER_ENV, ClusterInfo, connect
from .config import RuntimeConfig
from .driver_sink import DriverSink
from .errors import AgentDiedError, RuntimeFailure
from .events import RunFinished, StreamEvent
from .grpc_client import Channels
from .grpc_server import start_server
from .placement import ActorOptions, describe_cluster, resolve, warn_if_short, worker_threads
from .reachability import check_reachable
from .registry import NAMESPACE, Registry, registry_name
from .results import PipelineResult
from .run_loop import RunSpec, drive
from .span_record import SpanRecord
from .tracing import collect_spans, flush_all
from .worker_actor import WorkerActor


@dataclass
class AgentGroup:
    """One pipeline's agent actors."""

    group: str
    handles: dict[str, Any]
    addresses: dict[str, str]


class Session:
    def __init__(
        self,
        workers: int = 1,
        model: str | None = None,
        *,
        address: str | None = None,
        config: RuntimeConfig | None = None,
    ) -> None:
        """`model` overrides config.worker.model (default: KVMESH_MODEL, else smollm2); the rest of what a
        worker runs (device, weights, threads, engine settings) is config.worker, a WorkerConfig."""
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.config = config or RuntimeConfig()
        if self.config.token is None:  # every server of the session answers only calls that carry it
            self.config = dataclasses.replace(self.config, token=secrets.token_urlsafe(32))
        self.driver_key = secrets.token_urlsafe(32)  # agents take START and CANCEL only with it
        if model is not None:
            self.config = dataclasses.replace(self.config, worker=dataclasses.replace(self.config.worker, model=model))
        self.model = self.config.worker.model
        self.cluster: ClusterInfo = connect(address)
        check_reachable(self.config, self.cluster.node_ips)  # loopback defaults cannot span machines
        self.worker_options: ActorOptions = resolve("worker", [self.config.worker_placement], self.cluster.resources)
        self.id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._groups: weakref.WeakKeyDictionary[Pipeline, AgentGroup] = weakref.WeakKeyDictionary()
        self._group_count = 0
        self._closed = False
        # the registry lives on the driver's node (hard: were it placed elsewhere, losing that node would take
        # routing down with it, while the driver's own node going takes the session anyway)
        beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.registry = (
            ray.remote(Registry)
            .options(name=registry_name(self.id), namespace=NAMESPACE, num_cpus=0, scheduling_strategy=beside_driver)
            .remote()
        )
        self.sink = DriverSink()
        self._server = start_server(
            self.config,
            {AGENT_SERVICE: lambda server: agent_pb2_grpc.add_AgentServiceServicer_to_server(self.sink, server)},
            "driver",
        )
        self.sink.address = self._server.address
        self.channels = Channels(self.config)
        self.redis: EmbeddedRedis | None = None
        self.workers: dict[str, Any] = {}
        try:
            self._start_kv_store()
            self._start_workers(workers)
        except BaseException:
            self.close()
            raise

    # -- runs ------------------------------------------------------------------------------------------
    def run(self, pipeline: Pipeline, query: str, *, timeout_s: float | None = None) -> PipelineResult:
        """Run to the end: the outputs, the history, and a record per agent call (see PipelineResult)."""
        _check_arguments(pipeline, query)
        with self.ctrl_c_cancels():
            for event in self._drive(pipeline, query, stream=False, timeout_s=timeout_s):
                if isinstance(event, RunFinished):
                    return event.result
        raise AssertionError("a run always ends with RunFinished or an error")

    def stream(self, pipeline: Pipeline, query: str, *, timeout_s: float | None = None) -> Iterator[StreamEvent]:
        """Events as they happen: PhaseStarted, Token, Retried, AgentFinished, and last RunFinished."""
        _check_arguments(pipeline, query)
        return self._drive(pipeline, query, stream=True, timeout_s=timeout_s)

    def _drive(self, pipeline: Pipeline, query: str, stream: bool, timeout_s: float | None) -> Iterator[StreamEvent]:
        group = self._agents_for(pipeline)
        spec = RunSpec(
            pipeline, query, group.addresses, self.sink.address, self.driver_key, stream=stream, timeout_s=timeout_s
        )
        try:
            yield from drive(spec, self.sink, self.channels)
        except AgentDiedError:
            self.release(pipeline)  # an agent actor is gone: start fresh ones next run
            raise
        except KeyboardInterrupt:
            self.release(pipeline)  # Ctrl-C: the run is cancelled (drive sent CANCEL); free its actors
            raise

    # -- actors ----------------------------------------------------------------------------------------
    def _start_kv_store(self) -> None:
        """KVCOMM's store (ARCHITECTURE.md, "KV memory"): the configured Redis, or a private redis-server for
        this session; and the secret the workers seal its records with (kvcomm/record_seal.py), travelling in
        the config."""
        if self.config.store_secret is None:
            self.config = dataclasses.replace(self.config, store_secret=store_secret_for(self.config.token))
        if self.config.redis_url is not None:
            return
        # no redis-server installed: its error names the install step
        self.redis = EmbeddedRedis(self.config.redis_max_memory_bytes)
        self.config = dataclasses.replace(self.config, redis_url=self.redis.url)  # carries the password
        print(
            f"kvmesh: started a local redis-server at {self.redis.display_url} for this session "
            "(set KVMESH_REDIS_URL to use your own)",
            file=sys.stderr,
        )

    def _start_workers(self, count: int) -> None:
        actor = ray.remote(WorkerActor)
        options = self.worker_options
        warn_if_short(options, count, self.cluster.resources)
        self.worker_threads = self.config.worker.threads or worker_threads(options, count, self.cluster.nodes)
        threads = str(self.worker_threads)  # process-wide, before torch loads: torch keeps its setting per thread
        for i in range(count):
            name = f"worker-{i}"
            self.workers[name] = actor.options(
                name=f"kvmesh-{self.id}-{name}",
                namespace=NAMESPACE,
                max_restarts=1,  # a crashed worker comes back once (fresh engine, new port, registered again)
                runtime_env={"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
                **options.ray_options(),
            ).remote(name, self.id, self.config, self.worker_threads)
        self._wait_ready(self.workers, "worker", f"each asks for {options.describe()}")

    def _agents_for(self, pipeline: Pipeline) -> AgentGroup:
        with self._lock:
            if self._closed:
                raise RuntimeFailure("this session is closed")
            group = self._groups.get(pipeline)
            if group is not None:
                return group
            self._group_count += 1
            group_id = f"{self.id}.{self._group_count}.{pipeline.name}"
            handles = {}
            actor = ray.remote(AgentActor)
            options = self.agent_options(pipeline)
            warn_if_short(options, len(pipeline.agents), self.cluster.resources)
            for agent in pipeline.agents.values():
                tools = {p.source: pipeline.tools[p.source] for p in agent.placeholders if p.source in pipeline.tools}
                payload = portable.dumps((agent, tools), [t.fn for t in tools.values()])
                handles[agent.name] = actor.options(
                    name=f"kvmesh-{group_id}-{agent.name}",
                    namespace=NAMESPACE,
                    runtime_env={"env_vars": dict(ACTOR_ENV)},
                    **options.ray_options(),
                ).remote(payload, group_id, pipeline.name, self.id, self.config, self.driver_key)
            try:
                addresses = self._wait_ready(handles, "agent", f"each asks for {options.describe()}")
            except BaseException:
                _kill(list(handles.values()))
                raise
            group = AgentGroup(group_id, handles, addresses)
            self._groups[pipeline] = group
            weakref.finalize(pipeline, _kill, list(handles.values()))
            return group

    def _wait_ready(self, handles: dict[str, Any], kind: str, sizing: str) -> dict[str, str]:
        refs = {name: handle.ready.remote() for name, handle in handles.items()}
        timeout = self.config.startup_timeout_s
        try:
            return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeFailure(
                f"{kind} actors did not start within {timeout:.0f} s (RuntimeConfig.startup_timeout_s); {sizing}, "
                f"and the cluster offers {describe_cluster(self.cluster.resources)} (placement: "
                f"RuntimeConfig.{kind}_placement, env KVMESH_{kind.upper()}_*)"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeFailure(f"a {kind} actor failed to start: {_cause(exc)}") from None

    def agent_options(self, pipeline: Pipeline) -> ActorOptions:
        """Where the pipeline's agent actors go: its agent_placement, then the session's (placement.py)."""
        levels = [pipeline.agent_placement, self.config.agent_placement]
        return resolve("agent", levels, self.cluster.resources)

    def agent_actors(self, pipeline: Pipeline) -> dict[str, Any]:
        """The pipeline's agent actor handles by agent name (started if they are not yet)."""
        return dict(self._agents_for(pipeline).handles)

    def interrupt(self) -> None:
        """Cancel the runs in progress: each raises KeyboardInterrupt in its caller (its agents get CANCEL and
        are released). Callable from a signal handler or another thread."""
        self.sink.interrupt()

    @contextlib.contextmanager
    def ctrl_c_cancels(self) -> Iterator[None]:
        """Within: the first Ctrl-C calls interrupt() (a clean cancel), a second one interrupts at once.
        Only in the main thread; elsewhere, and for a custom SIGINT handler already set, nothing changes."""
        main = threading.current_thread() is threading.main_thread()
        if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def on_sigint(signum: int, frame: object) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.interrupt()

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def release(self, pipeline: Pipeline) -> None:
        """Stop a pipeline's agent actors now (they also stop when the pipeline is garbage-collected)."""
        with self._lock:
            group = self._groups.pop(pipeline, None)
        if group is not None:
            self.registry.forget_agents.remote([f"{group.group}/{name}" for name in group.handles])
            self._flush_before_kill(list(group.handles.values()))
            _kill(list(group.handles.values()))

    # -- traces (tracing.py) ---------------------------------------------------------------------------
    def finished_spans(self, clear: bool = True) -> list[SpanRecord]:
        """With trace "memory": the finished spans of this process and of every actor of the session."""
        return collect_spans(self._actors(), clear)

    def flush_traces(self, timeout_s: float = 10.0) -> bool:
        """Export now what every process of the session still holds (batched OTLP spans); True if all did."""
        return flush_all(self._actors(), timeout_s)

    def _actors(self) -> list[Any]:
        with self._lock:
            agents = [handle for group in self._groups.values() for handle in group.handles.values()]
        return [*self.workers.values(), *agents]

    def _flush_before_kill(self, handles: list[Any]) -> None:
        """A killed actor runs no exit hooks: export its batched spans first (best effort, short)."""
        if "otlp" in self.config.trace_exporters and ray.is_initialized():
            with contextlib.suppress(Exception):  # an actor already gone has nothing left to send
                flush_all(handles, timeout_s=5.0)

    def close(self) -> None:
        """Stop every actor of the session and its driver server; Ray itself stays (see cluster.shutdown)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            groups = list(self._groups.values())
            self._groups.clear()
        agents = [handle for group in groups for handle in group.handles.values()]
        self._flush_before_kill([*agents, *self.workers.values()])
        _kill(agents)
        _kill(list(self.workers.values()))
        _kill([self.registry])
        self._server.stop(grace_s=0)
        self.channels.close()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_arguments(pipeline: object, query: object) -> None:
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"expected a kvmesh Pipeline, got {type(pipeline).__name__}")
    if not isinstance(query, str):
        raise TypeError(f"the query must be a str, got {type(query).__name__}")
    check_text(query, "the query")  # before any actor starts: a lone surrogate cannot cross gRPC


def _kill(handles: list[Any]) -> None:
    if not ray.is_initialized():
        return
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already dead, or Ray is shutting down: nothing left to free
            continue


def _cause(exc: BaseException) -> str:
    """The user-facing line of an actor's creation error (Ray wraps it in a long report)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0]:
            return line
    return lines[-1] if lines else type(exc).__name__
