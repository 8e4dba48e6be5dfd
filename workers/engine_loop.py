"""Drives an Engine from one background thread so that many callers can stream concurrently.

Callers submit requests from any thread and iterate over their own token events; the loop thread is
the only one touching the engine, so the engine itself needs no locks. A request the engine failed alone
raises RequestFailed on its own stream; an engine step that raises fails every request in the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence

from .engine import Engine, RequestFailed, TokenEvent
from .prompt_reuse import PromptReuse
from .sampling import SamplingParams

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05


class RequestStream:
    """Token events of one request, in order; raises the request's error if it failed (InvalidRequestError,
    EngineOverloaded when it was refused; RequestFailed when it failed while being served)."""

    def __init__(self, loop: EngineLoop, request_id: str) -> None:
        self.request_id = request_id
        self._loop = loop
        self._events: queue.Queue[TokenEvent | BaseException] = queue.Queue()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def cancel(self) -> None:
        self._loop.cancel(self.request_id)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = 0
        self._id_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        role: str | None = None,
        reuse: PromptReuse | None = None,
    ) -> RequestStream:
        """Queue a request (see Engine.add_request for role and reuse); its events arrive on the stream."""
        if self._stopped.is_set():
            raise RuntimeError("the engine loop is closed")
        with self._id_lock:
            self._ids += 1
            request_id = request_id or f"loop-{self._ids}"
        stream = RequestStream(self, request_id)
        self._inbox.put(("submit", list(prompt_ids), sampling, stream, role, reuse))
        return stream

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def close(self) -> None:
        self._stopped.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # an engine fault fails the requests in flight, not the loop
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is None:
                    continue
                if event.finished:
                    del self._streams[event.request_id]
                if event.error is not None:
                    stream._events.put(RequestFailed(f"request {event.request_id!r} failed: {event.error}"))
                else:
                    stream._events.put(event)
        self._fail_all(RuntimeError("the engine loop was closed"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        if item[0] == "submit":
            _, prompt, sampling, stream, role, reuse = item
            try:
                self.engine.add_request(prompt, sampling, stream.request_id, role=role, reuse=reuse)
            except Exception as exc:  # invalid or refused (queue full): its caller gets the error
                stream._events.put(exc)
                return
            self._streams[stream.request_id] = stream
        elif item[0] == "cancel":
            self.engine.cancel(item[1])

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.cancel(request_id)
            stream._events.put(exc)
        self._streams.clear()
