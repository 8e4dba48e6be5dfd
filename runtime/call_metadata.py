"""gRPC call metadata: the one place kvmesh writes into, and reads from, the metadata of every call.

Clients attach `outgoing(config)` to each call (grpc_interceptors.ClientCallInterceptor): the shared
token and the W3C trace context (traceparent/tracestate) of the span current when the call is made.
Servers read `incoming(...)` once per call (grpc_interceptors.ServerCallInterceptor): the token to
check, and the remote parent that the handler then runs under, so one run is one trace across actors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from opentelemetry.context import Context

from .config import RuntimeConfig
from .tracing import context_from_headers, current_context_headers

TOKEN_KEY = "authorization"
DRIVER_KEY = "kvmesh-driver-key"  # START and CANCEL carry the session driver's own key (agents check it)
_BEARER = "Bearer "


def from_driver(driver_key: str) -> tuple[tuple[str, str], ...]:
    """Extra metadata for the driver's START and CANCEL messages."""
    return ((DRIVER_KEY, driver_key),)


def outgoing(config: RuntimeConfig) -> tuple[tuple[str, str], ...]:
    """Metadata for a call of this session made now (the trace context is the caller's current span)."""
    metadata: list[tuple[str, str]] = current_context_headers()
    if config.token:
        metadata.append((TOKEN_KEY, _BEARER + config.token))
    return tuple(metadata)


@dataclass(frozen=True)
class CallContext:
    """What a server learns from a call's metadata."""

    token: str | None
    metadata: dict[str, str] = field(default_factory=dict)  # every text entry, lower-cased keys
    trace_parent: Context | None = None  # the caller's span, when the call carries a trace context


def incoming(metadata: Iterable[tuple[str, str | bytes]] | None) -> CallContext:
    entries = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    auth = entries.get(TOKEN_KEY, "")
    token = auth[len(_BEARER) :] if auth.startswith(_BEARER) else None
    return CallContext(token=token, metadata=entries, trace_parent=context_from_headers(entries))
