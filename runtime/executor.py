"""The runtime as the executor of `Pipeline.run` / `Pipeline.stream`, over a default Session.

The default session starts on the first run (embedded Ray unless RAY_ADDRESS is set; KVMESH_WORKERS
workers, default 1; KVMESH_MODEL, default smollm2) and closes at exit. Pass `session=` to use your own.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator

from kvmesh.agents import Pipeline

from .driver import Session
from .events import StreamEvent
from .results import PipelineResult

_lock = threading.Lock()
_default: Session | None = None


def default_session() -> Session:
    global _default
    with _lock:
        if _default is None or _default._closed:
            workers = os.environ.get("KVMESH_WORKERS", "1")
            if not workers.isdigit() or int(workers) < 1:
                raise ValueError(f"KVMESH_WORKERS={workers!r}: give a number of workers >= 1")
            _default = Session(workers=int(workers), model=os.environ.get("KVMESH_MODEL", "smollm2"))
            atexit.register(_default.close)
        return _default


class RuntimeExecutor:
    def run(
        self, pipeline: Pipeline, query: str, *, session: Session | None = None, timeout_s: float | None = None
    ) -> PipelineResult:
        return (session or default_session()).run(pipeline, query, timeout_s=timeout_s)

    def stream(
        self, pipeline: Pipeline, query: str, *, session: Session | None = None, timeout_s: float | None = None
    ) -> Iterator[StreamEvent]:
        return (session or default_session()).stream(pipeline, query, timeout_s=timeout_s)
