"""SpanRecord: a finished span as plain, picklable data, to carry spans out of an actor (Ray) and assert on them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan


def _plain(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    # SDK attribute values are str/bool/int/float or tuples of those; lists compare better in tests and JSON
    return {key: list(value) if isinstance(value, tuple) else value for key, value in (attributes or {}).items()}


@dataclass(frozen=True)
class SpanRecord:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None  # None for a root span
    kind: str  # INTERNAL, SERVER, CLIENT, ...
    start_ns: int
    end_ns: int
    status: str  # UNSET, OK or ERROR
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, attributes), e.g. ("exception", {...})
    resource: dict[str, Any] = field(default_factory=dict)  # which process: service.name, kvmesh.process, pid

    @classmethod
    def of(cls, span: ReadableSpan) -> SpanRecord:
        context = span.context
        assert context is not None, "a finished SDK span always has a context"
        return cls(
            name=span.name,
            trace_id=f"{context.trace_id:032x}",
            span_id=f"{context.span_id:016x}",
            parent_id=f"{span.parent.span_id:016x}" if span.parent is not None else None,
            kind=span.kind.name,
            start_ns=span.start_time or 0,
            end_ns=span.end_time or 0,
            status=span.status.status_code.name,
            status_message=span.status.description or "",
            attributes=_plain(span.attributes),
            events=tuple((event.name, _plain(event.attributes)) for event in span.events),
            resource=_plain(span.resource.attributes),
        )

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def children(spans: Iterable[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    """The spans whose parent is `parent`, in start order."""
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)
