"""OpenTelemetry set-up for the runtime: a TracerProvider per process, trace context in gRPC metadata.

RuntimeConfig.trace (env KVMESH_TRACE) picks the exporters, the same in every process of a session:

- ``console``: each process prints its spans to its stdout (an actor's stdout is its Ray log file);
- ``otlp``: OTLP/gRPC through the SDK exporter, configured by the standard variables it honours
  (OTEL_EXPORTER_OTLP_ENDPOINT / _TRACES_ENDPOINT, _HEADERS, _INSECURE, ...), OTEL_SERVICE_NAME,
  OTEL_RESOURCE_ATTRIBUTES and OTEL_BSP_* for batching. They are read from config.trace_env (the
  driver's OTEL_* when the config was made), in the driver and in every actor alike;
- ``memory``: kept in the process, for tests (Session.finished_spans collects them from every actor), the
  newest MEMORY_SPANS of them: a long session that nobody collects from does not grow without bound;
- ``off`` (default): a no-op tracer, and no trace context is written into calls.

Several at once: ``otlp,memory``. The provider is kvmesh's own, not the global one, so a driver can hold
sessions traced differently and a user's own OpenTelemetry set-up stays as it is. Only runtime/ imports
OpenTelemetry: agents, workers and the KV code report plain stats, which runtime/spans.py turns into spans.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .config import RuntimeConfig
from .span_record import SpanRecord

TRACER_NAME = "kvmesh.runtime"
TRACEPARENT = "traceparent"  # the W3C header; its presence is what makes extraction worth doing
_PROPAGATOR = TraceContextTextMapPropagator()

try:
    _VERSION = version("kvmesh")
except PackageNotFoundError:  # running from a plain checkout
    _VERSION = "0"


class _OpenSpans(SpanProcessor):
    """Counts spans started and not yet ended, so a collector can wait until a process's spans are done
    (an agent tells the driver its OUTPUT before its own span ends)."""

    def __init__(self) -> None:
        self._open = 0
        self._idle = threading.Condition()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        with self._idle:
            self._open += 1

    def on_end(self, span: ReadableSpan) -> None:
        with self._idle:
            self._open -= 1
            if self._open <= 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._open <= 0, timeout=timeout_s)


class _RecentSpans(SpanExporter):
    """The newest `limit` finished spans of this process (older ones are dropped and counted)."""

    def __init__(self, limit: int) -> None:
        self._spans: collections.deque[ReadableSpan] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.dropped += max(0, len(self._spans) + len(spans) - (self._spans.maxlen or 0))
            self._spans.extend(spans)
        return SpanExportResult.SUCCESS

    def take(self, clear: bool) -> list[ReadableSpan]:
        with self._lock:
            spans = list(self._spans)
            if clear:
                self._spans.clear()
            return spans

    def shutdown(self) -> None:
        pass


MEMORY_SPANS = 100_000
_lock = threading.Lock()
_providers: dict[tuple[frozenset[str], tuple[tuple[str, str], ...]], TracerProvider] = {}
_memory = _RecentSpans(MEMORY_SPANS)  # this process's finished spans, when "memory" is on
_open_spans = _OpenSpans()
_process = "driver"  # what kvmesh.process says in this process's resource; actors name themselves in install()


def install(config: RuntimeConfig, process: str) -> None:
    """Set up tracing in an actor process, before anything traces: `process` names it in the resource."""
    global _process
    if not config.trace_exporters:
        return
    with _lock:
        _process = process
    tracer(config)


def tracer(config: RuntimeConfig) -> trace.Tracer:
    """The tracer for a session's setting: a no-op one when tracing is off (spans cost next to nothing)."""
    exporters = config.trace_exporters
    if not exporters:
        return trace.NoOpTracer()
    key = (exporters, config.trace_env)
    with _lock:
        provider = _providers.get(key)
        if provider is None:
            with _environment(config.trace_env):  # the SDK reads OTEL_* while it builds its parts
                provider = _providers[key] = _new_provider(exporters)
    return provider.get_tracer(TRACER_NAME, _VERSION)


@contextlib.contextmanager
def _environment(overrides: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """The session's OTEL_* settings in os.environ for a moment: they win over what this process inherited."""
    saved = {name: os.environ.get(name) for name, _ in overrides}
    os.environ.update(dict(overrides))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _new_provider(exporters: frozenset[str]) -> TracerProvider:
    attributes: dict[str, Any] = {"kvmesh.process": _process, "process.pid": os.getpid()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "kvmesh"
    provider = TracerProvider(resource=Resource.create(attributes))  # flushes itself at exit
    if "memory" in exporters:
        provider.add_span_processor(_open_spans)
        provider.add_span_processor(SimpleSpanProcessor(_memory))
    if "console" in exporters:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*, OTEL_BSP_*
    return provider


def flush(timeout_s: float = 10.0) -> bool:
    """Export what this process's providers still hold (batched OTLP spans); False if one timed out."""
    with _lock:
        providers = list(_providers.values())
    return all(provider.force_flush(int(timeout_s * 1000)) for provider in providers)


def finished_spans(clear: bool = True, wait_s: float = 5.0) -> list[SpanRecord]:
    """This process's spans kept by the memory exporter, once its open spans have ended (up to wait_s)."""
    _open_spans.wait_idle(wait_s)
    return [SpanRecord.of(span) for span in _memory.take(clear)]


class TracedActor:
    """Ray methods of every kvmesh actor, for its traces: hand over the finished spans, flush the exporters."""

    def trace_spans(self, clear: bool = True) -> list[SpanRecord]:
        return finished_spans(clear)

    def trace_flush(self, timeout_s: float = 10.0) -> bool:
        return flush(timeout_s)


def collect_spans(handles: list[Any], clear: bool = True) -> list[SpanRecord]:
    """This process's spans and those of the actors behind `handles` (their memory exporters)."""
    import ray

    spans = finished_spans(clear)
    for chunk in ray.get([handle.trace_spans.remote(clear) for handle in handles], timeout=60):
        spans.extend(chunk)
    return spans


def flush_all(handles: list[Any], timeout_s: float = 10.0) -> bool:
    """Flush this process's exporters and those of the actors behind `handles`."""
    import ray

    done = flush(timeout_s)
    return all(ray.get([handle.trace_flush.remote(timeout_s) for handle in handles], timeout=timeout_s + 5)) and done


# -- trace context across processes (call_metadata.py puts it into, and reads it from, gRPC metadata) --------
def current_context_headers() -> list[tuple[str, str]]:
    """W3C traceparent/tracestate of the span current in this thread; nothing when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return []  # the common case when tracing is off: no dict, no formatting
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return list(carrier.items())


def context_from_headers(headers: Mapping[str, str]) -> Context | None:
    """The remote parent a call's metadata carries, or None."""
    if TRACEPARENT not in headers:
        return None
    context = _PROPAGATOR.extract(headers)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


# -- small span helpers -------------------------------------------------------------------------------------
def activated(span: trace.Span) -> contextlib.AbstractContextManager[trace.Span]:
    """Make `span` current for a block (so calls made there carry it), without ending it after."""
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def record_error(span: trace.Span, exc: BaseException, description: str | None = None) -> None:
    """An error on a span as the conventions want it: status ERROR, error.type, an exception event."""
    span.set_status(Status(StatusCode.ERROR, description or f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc)


@contextlib.contextmanager
def attached(context: Context) -> Iterator[None]:
    """Run a block with `context` (a remote parent) as the current one."""
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)
