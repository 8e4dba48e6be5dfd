"""AgentService over gRPC, as each agent serves it: an inbox that starts the agent's call when it can.

Deliver only files the message and returns: START (from the driver) and OUTPUTs (from same-phase
agents) are buffered per (run, phase), in any order; once the START and every OUTPUT it waits for are
in, the call runs on the agent's own thread pool (handler threads never block on long work). CANCEL
drops a run's buffers and stops its call in flight. START and CANCEL are taken only with the session
driver's key (beside the session token every call carries): a START names the inputs the agent's tools run
on and where its output goes, so nothing else may send one. Buffers of runs that never complete (a driver
gone mid-run) are dropped after `inbox_ttl_s`, and at most `max_inboxes` are held.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from kvmesh.v1 import agent_pb2, agent_pb2_grpc

from .agent_runner import AgentRunner, RunCancel
from .call_metadata import DRIVER_KEY, incoming
from .wire import Kind

PhaseKey = tuple[str, int, bool]  # run id, phase index, final phase
_REMEMBER_CANCELLED = 1024  # cancelled run ids kept, so late messages of those runs are dropped
log = logging.getLogger(__name__)


@dataclass
class _Inbox:
    start: agent_pb2.Message | None = None
    outputs: dict[str, agent_pb2.Message] = field(default_factory=dict)
    # the START handler's context: the call runs in it on the pool thread, so whatever the server
    # interceptor put in context for that call (the driver's trace context: the agent span's parent) carries over
    context: contextvars.Context | None = None
    created: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        return self.start is not None and set(self.start.wait_for) <= set(self.outputs)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        runner: AgentRunner,
        address: Callable[[], str],
        driver_key: str,
        *,
        threads: int = 4,
        max_inboxes: int = 1024,
        inbox_ttl_s: float = 3600.0,
    ) -> None:
        self.runner = runner
        self._address = address
        self._driver_key = driver_key.encode()
        self._max_inboxes = max_inboxes
        self._inbox_ttl_s = inbox_ttl_s
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
        if request.kind in (Kind.START, Kind.CANCEL) and not self._from_driver(context):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{Kind.Name(request.kind)} is taken only from this agent's session driver (no or a wrong driver key)",
            )
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
            if key not in self._inboxes:
                self._make_room()
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

    def _from_driver(self, context: grpc.ServicerContext) -> bool:
        given = dict(incoming(context.invocation_metadata()).metadata).get(DRIVER_KEY, "")
        return hmac.compare_digest(given.encode(), self._driver_key)

    def _make_room(self) -> None:
        """Under the lock: drop buffers older than the TTL, then the oldest while over the bound."""
        now = time.monotonic()
        stale = [key for key, inbox in self._inboxes.items() if now - inbox.created > self._inbox_ttl_s]
        while len(self._inboxes) - len(stale) >= self._max_inboxes:
            oldest = min((k for k in self._inboxes if k not in stale), key=lambda k: self._inboxes[k].created)
            stale.append(oldest)
        for key in stale:
            del self._inboxes[key]
        if stale:
            log.warning(
                "agent %s dropped %d waiting run buffer(s) (stale or over %d)",
                self.runner.agent.name,
                len(stale),
                self._max_inboxes,
            )

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
                waiting_runs=len(self._inboxes),
            )
