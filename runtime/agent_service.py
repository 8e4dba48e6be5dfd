"""AgentService over gRPC, as each agent serves it: an inbox that starts the agent's call when it can.

Deliver only files the message and returns: START (from the driver) and OUTPUTs (from same-phase
agents) are buffered per (run, phase), in any order; once the START and every OUTPUT it waits for are
in, the call runs on the agent's own thread pool (handler threads never block on long work). CANCEL
drops a run's buffers and stops its call in flight.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from kvmesh.v1 import agent_pb2, agent_pb2_grpc

from .agent_runner import AgentRunner, RunCancel
from .wire import Kind

PhaseKey = tuple[str, int, bool]  # run id, phase index, final phase
_REMEMBER_CANCELLED = 1024  # cancelled run ids kept, so late messages of those runs are dropped


@dataclass
class _Inbox:
    start: agent_pb2.Message | None = None
    outputs: dict[str, agent_pb2.Message] = field(default_factory=dict)
    # the START handler's context: the call runs in it on the pool thread, so whatever the server
    # interceptor put in context for that call (the driver's trace context: the agent span's parent) carries over
    context: contextvars.Context | None = None

    def ready(self) -> bool:
        return self.start is not None and set(self.start.wait_for) <= set(self.outputs)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, runner: AgentRunner, address: Callable[[], str], threads: int = 4) -> None:
        self.runner = runner
        self._address = address
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"agent-{runner.agent.name}")
        self._lock = threading.Lock()
        self._inboxes: dict[PhaseKey, _Inbox] = {}
        self._runs: dict[str, tuple[RunCancel, int]] = {}  # run id -> its cancel, calls in flight
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._active = 0
        self._calls = 0
        self._last_error = ""
        self._last_failed = False

    def Deliver(self, request: agent_pb2.Message, context: grpc.ServicerContext) -> agent_pb2.Ack:
        if request.kind == Kind.CANCEL:
            self._cancel(request.run_id)
            return agent_pb2.Ack()
        if request.kind not in (Kind.START, Kind.OUTPUT):
            kind = Kind.Name(request.kind)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"an agent takes START, OUTPUT or CANCEL, not {kind}")
        key = (request.run_id, int(request.phase), bool(request.final_phase))
        with self._lock:
            if request.run_id in self._cancelled:
                return agent_pb2.Ack()
            inbox = self._inboxes.setdefault(key, _Inbox())
            if request.kind == Kind.START:
                inbox.start = request
                inbox.context = contextvars.copy_context()
            else:
                inbox.outputs[request.source] = request
            if not inbox.ready():
                return agent_pb2.Ack()
            del self._inboxes[key]
            cancel, in_flight = self._runs.get(request.run_id, (RunCancel(), 0))
            self._runs[request.run_id] = (cancel, in_flight + 1)
            self._active += 1
        assert inbox.context is not None
        self._pool.submit(inbox.context.run, self._call, inbox, cancel)
        return agent_pb2.Ack()

    def _call(self, inbox: _Inbox, cancel: RunCancel) -> None:
        assert inbox.start is not None
        error = self.runner.run(inbox.start, inbox.outputs, cancel)
        run_id = inbox.start.run_id
        with self._lock:
            self._active -= 1
            self._calls += 1
            self._last_failed = error is not None and error != "cancelled"
            if self._last_failed:
                self._last_error = error or ""
            if run_id in self._runs:
                cancel, in_flight = self._runs[run_id]
                if in_flight > 1:
                    self._runs[run_id] = (cancel, in_flight - 1)
                else:
                    del self._runs[run_id]

    def _cancel(self, run_id: str) -> None:
        with self._lock:
            self._cancelled[run_id] = None
            while len(self._cancelled) > _REMEMBER_CANCELLED:
                self._cancelled.popitem(last=False)
            for key in [k for k in self._inboxes if k[0] == run_id]:
                del self._inboxes[key]
            entry = self._runs.pop(run_id, None)
        if entry is not None:
            entry[0].cancel()

    def Status(self, request: agent_pb2.StatusRequest, context: grpc.ServicerContext) -> agent_pb2.AgentStatus:
        with self._lock:
            state = "generating" if self._active else "waiting" if self._inboxes else "idle"
            if state == "idle" and self._last_failed:
                state = "failed"
            return agent_pb2.AgentStatus(
                name=self.runner.agent.name,
                state=state,
                calls=self._calls,
                last_error=self._last_error,
                address=self._address(),
            )
