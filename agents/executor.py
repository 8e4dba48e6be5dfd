"""Where `Pipeline.run` and `Pipeline.stream` go: an executor registered by whoever can run pipelines.

agents/ imports nothing of the runtime; `import kvmesh` registers the distributed runtime here lazily
(a factory, so Ray and gRPC load only when a run starts). `run_locally` needs no executor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .run_state import RunResult


class Executor(Protocol):
    def run(self, pipeline: Pipeline, query: str, **options: Any) -> RunResult:
        """Run to the end; return the outputs (and whatever records the executor keeps)."""
        ...

    def stream(self, pipeline: Pipeline, query: str, **options: Any) -> Iterator[Any]:
        """Yield events as agents produce them; the last event carries the result."""
        ...


_lock = threading.Lock()
_factory: Callable[[], Executor] | None = None
_executor: Executor | None = None


def set_executor(factory: Callable[[], Executor] | None) -> None:
    """Register what runs pipelines: a zero-argument factory, called once, on the first run."""
    global _factory, _executor
    with _lock:
        _factory, _executor = factory, None


def get_executor() -> Executor:
    global _executor
    with _lock:
        if _executor is None:
            if _factory is None:
                raise RuntimeError(
                    "no pipeline executor is registered: `import kvmesh` registers the distributed runtime; "
                    "to run in this process with your own LLM function, use kvmesh.agents.run_locally"
                )
            _executor = _factory()
        return _executor
