"""The driver's own AgentService: where agents send OUTPUT, TOKEN, RETRY and ERROR, queued per run."""

from __future__ import annotations

import queue
import threading

import grpc

from kvmesh.v1 import agent_pb2, agent_pb2_grpc

from .wire import DRIVER

# put in a run's queue by interrupt(): the run loop raises KeyboardInterrupt when it takes it out
INTERRUPT = agent_pb2.Message(kind=agent_pb2.Message.CANCEL, source="interrupt")


class DriverSink(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.address = ""
        self._runs: dict[str, queue.Queue[agent_pb2.Message]] = {}
        self._lock = threading.Lock()

    def open(self, run_id: str) -> queue.Queue[agent_pb2.Message]:
        inbox: queue.Queue[agent_pb2.Message] = queue.Queue()
        with self._lock:
            self._runs[run_id] = inbox
        return inbox

    def close(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def interrupt(self) -> None:
        """Make every run in progress stop with KeyboardInterrupt at its next message. Safe in a signal handler:
        it only puts into queues (raising there could be swallowed by whatever code the signal interrupted)."""
        with self._lock:
            inboxes = list(self._runs.values())
        for inbox in inboxes:
            inbox.put(INTERRUPT)

    def Deliver(self, request: agent_pb2.Message, context: grpc.ServicerContext) -> agent_pb2.Ack:
        with self._lock:
            inbox = self._runs.get(request.run_id)
        if inbox is not None:  # else a run that ended (failed or cancelled): late messages are dropped
            inbox.put(request)
        return agent_pb2.Ack()

    def Status(self, request: agent_pb2.StatusRequest, context: grpc.ServicerContext) -> agent_pb2.AgentStatus:
        with self._lock:
            runs = len(self._runs)
        return agent_pb2.AgentStatus(name=DRIVER, state="waiting" if runs else "idle", address=self.address)
