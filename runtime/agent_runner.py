"""One agent call, inside the agent's actor: render, route, generate (retrying once on a dead worker), deliver.

`AgentRunner.run` is the agent's whole share of a phase and never raises: the outcome goes to the
driver as OUTPUT (also sent to the same-phase agents that wait for it) or as ERROR naming the cause.
A worker that dies mid-call is waited for (Ray restarts it) and the call is retried once, from scratch
(the driver is told with RETRY, so streamed tokens can be discarded); a worker that stays dead fails
the call with an error naming it.

Each call is an `invoke_agent` span (spans.py), current while the agent works: it runs in the START's
context (agent_service.py), so its parent is the driver's workflow span, and the tools and the worker
call made under it nest below it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import ray
from opentelemetry.trace import Span

from kvmesh.agents import Agent, Prompt, Tool, ToolError
from kvmesh.agents.render import render
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.v1 import agent_pb2, agent_pb2_grpc, worker_pb2, worker_pb2_grpc

from .config import RuntimeConfig
from .errors import CallFailed, RuntimeFailure, WorkerDiedError
from .grpc_client import Channels, describe_rpc_error
from .registry import Route
from .spans import agent_span, end_agent, traced_tool
from .tracing import activated, record_error, tracer
from .wire import Kind, call_stats_from_wire, generate_request, message, phase_of, segment_ids

log = logging.getLogger(__name__)

# what a worker's death looks like from the client side of a stream (connection gone mid-call)
_Code = grpc.StatusCode
_MAYBE_DEAD = (_Code.UNAVAILABLE, _Code.UNKNOWN, _Code.INTERNAL, _Code.CANCELLED)


class Cancelled(Exception):
    """The driver cancelled the run."""


class RunCancel:
    """Cancellation of one run inside an agent: a flag, and the LLM call in flight to cancel."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def attach(self, call: grpc.Future | None) -> None:
        with self._lock:
            self._call = call
        if call is not None and self.cancelled:
            call.cancel()

    def cancel(self) -> None:
        self._event.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()


class AgentRunner:
    def __init__(
        self, agent: Agent, tools: Mapping[str, Tool], group: str, workflow: str, registry: Any, config: RuntimeConfig
    ) -> None:
        self.agent = agent
        self.tracer = tracer(config)
        traced = bool(config.trace_exporters)
        self.tools = {name: traced_tool(tool, self.tracer) if traced else tool for name, tool in tools.items()}
        self.group = group  # the pipeline's agents are registered as "{group}/{name}"
        self.workflow = workflow
        self.registry = registry
        self.config = config
        self.channels = Channels(config)
        self._peers: dict[str, str] = {}

    def key(self, name: str) -> str:
        return f"{self.group}/{name}"

    # -- the call --------------------------------------------------------------------------------------
    def run(self, start: agent_pb2.Message, upstream: Mapping[str, agent_pb2.Message], cancel: RunCancel) -> str | None:
        """Serve one START whose awaited OUTPUTs have all arrived. Returns None on success, else the cause
        (already sent to the driver as ERROR)."""
        started = time.perf_counter()
        key = self.key(self.agent.name)
        span = agent_span(self.tracer, self.agent, key, self.workflow, start.run_id, phase_of(start))
        try:
            with activated(span):
                return self._run(start, upstream, cancel, started, span)
        finally:
            span.end()

    def _run(
        self,
        start: agent_pb2.Message,
        upstream: Mapping[str, agent_pb2.Message],
        cancel: RunCancel,
        started: float,
        span: Span,
    ) -> str | None:
        try:
            values = dict(start.inputs) | {name: upstream[name].text for name in start.wait_for}
            prompt = render(self.agent, self.tools, values)  # tools run here, in the agent's process
            text, stats, attempts = self._generate(start, prompt, cancel)
            wall_s = time.perf_counter() - started
            end_agent(span, call_stats_from_wire(stats), wall_s, attempts)
            self._deliver(start, text, stats, wall_s, attempts)
            return None
        except Cancelled:
            span.set_attribute("kvmesh.cancelled", True)
            return "cancelled"
        except Exception as exc:
            cause = str(exc) if isinstance(exc, RuntimeFailure | ToolError) else f"{type(exc).__name__}: {exc}"
            log.warning("agent %s failed: %s", self.agent.name, cause, exc_info=not isinstance(exc, RuntimeFailure))
            record_error(span, exc, cause)
            if not cancel.cancelled:
                self._to_driver(start, self._message(start, Kind.ERROR, text=cause))
            return cause

    def _generate(
        self, start: agent_pb2.Message, prompt: Prompt, cancel: RunCancel
    ) -> tuple[str, worker_pb2.CallStats, int]:
        """The reply, its worker's CallStats as sent, and the attempts it took."""
        key = self.key(self.agent.name)
        for attempt in (1, 2):
            route: Route | None = ray.get(self.registry.route.remote(key, segment_ids(prompt)))
            if route is None:
                raise CallFailed("no workers are registered (all died, or none were started)")
            request_id = f"{start.run_id}/{self.agent.name}/{start.phase}/{attempt}-{uuid.uuid4().hex[:8]}"
            request = generate_request(self.agent, prompt, request_id, self.workflow, route.holders)
            output_segment = None
            try:
                text, stats = self._stream(start, route, request, cancel)
                output_segment = segment_id(self.agent.name, text)
                return text, stats, attempt
            except grpc.RpcError as exc:
                if cancel.cancelled:
                    raise Cancelled from exc
                failure = describe_rpc_error(exc, f"worker {route.worker!r} at {route.address}")
                if exc.code() not in _MAYBE_DEAD or not self._restarted(route):  # raises if it died for good
                    raise CallFailed(failure) from exc
                if attempt == 2:
                    raise CallFailed(f"{failure}; Ray restarted it and the retried call failed again") from exc
                reason = f"worker {route.worker!r} failed ({exc.code().name}); Ray restarted it, retrying once"
                log.warning("agent %s: %s", self.agent.name, reason)
                self._to_driver(start, self._message(start, Kind.RETRY, text=reason))
            finally:
                self.registry.finished.remote(key, route.worker, output_segment)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _stream(
        self, start: agent_pb2.Message, route: Route, request: worker_pb2.GenerateRequest, cancel: RunCancel
    ) -> tuple[str, worker_pb2.CallStats]:
        text: list[str] = []
        stats: worker_pb2.CallStats | None = None
        call = worker_pb2_grpc.WorkerServiceStub(self.channels.get(route.address)).Generate(request)
        cancel.attach(call)
        try:
            for chunk in call:
                text.append(chunk.text)
                if start.stream and chunk.text:
                    self._to_driver(start, self._message(start, Kind.TOKEN, text=chunk.text))
                if chunk.finished:
                    stats = chunk.stats
        finally:
            cancel.attach(None)
        if stats is None:
            raise CallFailed(f"worker {route.worker!r} ended the stream without its final chunk")
        return "".join(text), stats

    def _restarted(self, route: Route) -> bool:
        """After a failed call: wait for Ray to restart the worker. False if it is alive at the same address."""
        entry = ray.get(self.registry.worker.remote(route.worker))
        if entry is None:
            raise WorkerDiedError(route.worker, "it is no longer registered")
        timeout = self.config.worker_restart_timeout_s
        try:
            address = _await_ready(entry.handle, time.monotonic() + timeout)
        except ray.exceptions.GetTimeoutError:
            self.registry.remove_worker.remote(route.worker)  # routed to again once it registers (if ever)
            raise WorkerDiedError(
                route.worker,
                f"{_node_state(entry.node_id, entry.node_ip)}not back within {timeout:.0f} s "
                "(RuntimeConfig.worker_restart_timeout_s)",
            ) from None
        except ray.exceptions.RayActorError as exc:
            self.registry.remove_worker.remote(route.worker)
            raise WorkerDiedError(route.worker, _first_line(exc)) from None
        if address == route.address:
            return False
        self.channels.drop(route.address)
        return True

    # -- messages --------------------------------------------------------------------------------------
    def _message(self, start: agent_pb2.Message, kind: int, **fields: Any) -> agent_pb2.Message:
        return message(kind, start.run_id, phase_of(start), self.agent.name, **fields)

    def _deliver(
        self, start: agent_pb2.Message, text: str, stats: worker_pb2.CallStats, wall_s: float, attempts: int
    ) -> None:
        """OUTPUT, to the same-phase agents that wait for it and to the driver."""
        output_fields = {"text": text, "stats": stats, "wall_s": wall_s, "attempts": attempts}
        for name in start.deliver_to:
            output = self._message(start, Kind.OUTPUT, target=name, **output_fields)
            address = self._peer(name)
            try:
                agent_pb2_grpc.AgentServiceStub(self.channels.get(address)).Deliver(output)
            except grpc.RpcError as exc:
                raise CallFailed(describe_rpc_error(exc, f"delivering the output to agent {name!r}")) from exc
        self._to_driver(start, self._message(start, Kind.OUTPUT, target="driver", **output_fields))

    def _peer(self, name: str) -> str:
        address = self._peers.get(name)
        if address is None:
            address = ray.get(self.registry.agent_address.remote(self.key(name)))
            if address is None:
                raise CallFailed(f"agent {name!r} is not registered")
            self._peers[name] = address
        return address

    def _to_driver(self, start: agent_pb2.Message, msg: agent_pb2.Message) -> None:
        try:
            agent_pb2_grpc.AgentServiceStub(self.channels.get(start.driver)).Deliver(msg)
        except grpc.RpcError as exc:  # the driver is gone or gave up on the run: nobody to tell
            log.warning("agent %s: %s", self.agent.name, describe_rpc_error(exc, "the driver"))


def _await_ready(handle: ray.actor.ActorHandle, deadline: float) -> str:
    """The worker's address once it answers. While Ray is still restarting it, its calls fail with
    ActorUnavailableError (a RayActorError, but not a death): ask again until the deadline."""
    while True:
        try:
            return ray.get(handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() >= deadline:
                raise ray.exceptions.GetTimeoutError("still restarting") from None
            time.sleep(0.2)


def _node_state(node_id: str, node_ip: str) -> str:
    """ "its node 10.0.0.7 (1a2b3c4d…) left the cluster and Ray found no other node that offers its
    placement; " when that is what happened, else "" (the GCS is asked; it may lag a dead node by seconds)."""
    if not node_id:
        return ""
    try:
        alive = next((n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id), False)
    except Exception:  # the GCS itself is unreachable: say nothing rather than guess
        return ""
    if alive:
        return ""
    return (
        f"its node {node_ip or '?'} ({node_id[:8]}…) left the cluster and Ray found no other node that "
        "offers its placement; "
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
