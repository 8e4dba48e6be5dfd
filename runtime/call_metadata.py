"""gRPC call metadata: the one place kvmesh writes into, and reads from, the metadata of every call.

Clients attach `outgoing(config)` to each call (grpc_interceptors.ClientCallInterceptor); servers read
`incoming(...)` once per call (grpc_interceptors.ServerCallInterceptor). Today it carries the shared
token; trace context (W3C traceparent/tracestate) belongs here too: inject in `outgoing`, extract into
CallContext in `incoming`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import RuntimeConfig

TOKEN_KEY = "authorization"
_BEARER = "Bearer "


def outgoing(config: RuntimeConfig) -> tuple[tuple[str, str], ...]:
    """Metadata for an outgoing call of this session."""
    metadata: list[tuple[str, str]] = []
    if config.token:
        metadata.append((TOKEN_KEY, _BEARER + config.token))
    return tuple(metadata)


@dataclass(frozen=True)
class CallContext:
    """What a server learns from a call's metadata."""

    token: str | None
    metadata: dict[str, str] = field(default_factory=dict)  # every text entry, lower-cased keys


def incoming(metadata: Iterable[tuple[str, str | bytes]] | None) -> CallContext:
    entries = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    auth = entries.get(TOKEN_KEY, "")
    token = auth[len(_BEARER) :] if auth.startswith(_BEARER) else None
    return CallContext(token=token, metadata=entries)
