"""The registry: a named Ray actor per session mapping agents and workers to their gRPC addresses.

It also keeps what routing needs: calls in flight per worker, the worker each agent used last, and
which worker produced each segment (an agent's output, by segment id). A worker registers once per
start, so one that registers again was restarted: its caches are gone, and what it held is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .router import WorkerLoad, choose_worker

NAMESPACE = "kvmesh"
MAX_SEGMENTS = 100_000  # segment -> holder entries kept (LRU)


def registry_name(session_id: str) -> str:
    return f"kvmesh-registry-{session_id}"


@dataclass(frozen=True)
class WorkerEntry:
    name: str
    address: str
    model: str
    handle: Any  # the worker's Ray actor handle (to wait for its restart)
    registrations: int  # 2+ after Ray restarted it
    node_id: str = ""  # the Ray node it runs on (to tell a lost node from a crash)
    node_ip: str = ""


@dataclass(frozen=True)
class Route:
    worker: str
    address: str
    holders: dict[str, str]  # segment id -> address of the worker that produced it


class Registry:
    """Runs as a Ray actor; every method is quick and never blocks."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        self._agents: dict[str, str] = {}  # agent key -> address
        self._in_flight: dict[str, int] = {}
        self._last_worker: dict[str, str] = {}  # agent key -> worker name
        self._segments: OrderedDict[str, str] = OrderedDict()  # segment id -> worker name

    # -- workers ---------------------------------------------------------------------------------------
    def register_worker(
        self, name: str, address: str, model: str, handle: Any, node_id: str = "", node_ip: str = ""
    ) -> None:
        old = self._workers.get(name)
        if old is not None:  # registering again: Ray restarted it, its caches are empty
            self._segments = OrderedDict((s, w) for s, w in self._segments.items() if w != name)
            self._last_worker = {a: w for a, w in self._last_worker.items() if w != name}
        count = old.registrations + 1 if old is not None else 1
        self._workers[name] = WorkerEntry(name, address, model, handle, count, node_id, node_ip)
        self._in_flight[name] = 0

    def workers(self) -> list[WorkerEntry]:
        return list(self._workers.values())

    def worker(self, name: str) -> WorkerEntry | None:
        return self._workers.get(name)

    def remove_worker(self, name: str) -> None:
        """A worker Ray will not restart: route nothing more to it."""
        self._workers.pop(name, None)
        self._in_flight.pop(name, None)
        self._segments = OrderedDict((s, w) for s, w in self._segments.items() if w != name)
        self._last_worker = {a: w for a, w in self._last_worker.items() if w != name}

    # -- agents ----------------------------------------------------------------------------------------
    def register_agent(self, key: str, address: str) -> None:
        self._agents[key] = address

    def agent_address(self, key: str) -> str | None:
        return self._agents.get(key)

    def forget_agents(self, keys: list[str]) -> None:
        for key in keys:
            self._agents.pop(key, None)
            self._last_worker.pop(key, None)

    # -- routing ---------------------------------------------------------------------------------------
    def route(self, agent_key: str, segment_ids: list[str]) -> Route | None:
        """Pick a worker for a call (router.choose_worker) and count it in flight there; None: no workers."""
        if not self._workers:
            return None
        holders = [self._segments.get(s) for s in segment_ids]
        loads = [WorkerLoad(name, self._in_flight.get(name, 0)) for name in self._workers]
        name = choose_worker(loads, holders, self._last_worker.get(agent_key))
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        known = {s: self._workers[w].address for s, w in zip(segment_ids, holders, strict=True) if w in self._workers}
        return Route(name, self._workers[name].address, known)

    def finished(self, agent_key: str, worker: str, output_segment: str | None) -> None:
        """A routed call ended; on success its output segment now lives on `worker`."""
        if worker in self._in_flight:
            self._in_flight[worker] = max(0, self._in_flight[worker] - 1)
        if output_segment is None or worker not in self._workers:
            return
        self._last_worker[agent_key] = worker
        self._segments[output_segment] = worker
        self._segments.move_to_end(output_segment)
        while len(self._segments) > MAX_SEGMENTS:
            self._segments.popitem(last=False)
