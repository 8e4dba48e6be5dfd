"""Channels to kvmesh servers (TLS, limits, the session's metadata and deadlines) and readable RPC errors."""

from __future__ import annotations

import threading

import grpc

from .config import RuntimeConfig
from .grpc_interceptors import ClientCallInterceptor
from .grpc_server import message_options


def open_channel(address: str, config: RuntimeConfig) -> grpc.Channel:
    """A channel whose every call carries the session's metadata, a deadline and the size limit."""
    options: list[tuple[str, int | str]] = [*message_options(config)]
    if config.tls:
        if config.tls_server_name:
            options.append(("grpc.ssl_target_name_override", config.tls_server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=config.read("tls_ca"))
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, ClientCallInterceptor(config))


class Channels:
    """One channel per address, opened on first use and shared by threads; close() closes them all."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = open_channel(address, self.config)
            return channel

    def drop(self, address: str) -> None:
        with self._lock:
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "nothing answers there (the process died or has not started)",
    grpc.StatusCode.UNAUTHENTICATED: "the server requires the session's token (KVMESH_TOKEN)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer within the deadline (RuntimeConfig.call_deadline_s / "
    "generate_deadline_s)",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a message over the size limit (RuntimeConfig.max_message_bytes, env "
    "KVMESH_MAX_MESSAGE_MB), or a server at its limit of calls or queued requests (retry later)",
}


def describe_rpc_error(exc: grpc.RpcError, target: str) -> str:
    """One line: what failed, the gRPC status and details, and what it usually means."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    hint = _HINTS.get(code) if code is not None else None
    name = code.name if code is not None else "error"
    return f"{target}: {name}: {details}" + (f" — {hint}" if hint and hint not in (details or "") else "")
