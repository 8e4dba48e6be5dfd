"""What happens on every gRPC call, on both ends: metadata, the token check, trace context, deadlines, size limits.

Server side, ServerCallInterceptor reads each call's metadata once, refuses a call without the
session's token (UNAUTHENTICATED) — health checks excepted, so that probes need no secret — and runs
the handler under the caller's trace context when the call carries one (for a streamed response, each
step of it). Client side, ClientCallInterceptor attaches the session's metadata as of the call (token,
current trace context), gives every call a deadline when the caller set none, and refuses to send a
message over the size limit with an error naming the setting.
"""

from __future__ import annotations

import collections
import hmac
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from opentelemetry.context import Context

from .call_metadata import incoming, outgoing
from .config import RuntimeConfig
from .errors import MessageTooLargeError
from .tracing import attached

# health probes (kubelet, grpc_health_probe) carry no secrets; what they reveal is harmless
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")

Behavior = Callable[..., Any]


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior]) -> grpc.RpcMethodHandler:
    """The same handler with its behavior (request, context) -> response(s) replaced by wrap(behavior)."""
    if handler.request_streaming and handler.response_streaming:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return make(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ServerCallInterceptor(grpc.ServerInterceptor):
    def __init__(self, config: RuntimeConfig) -> None:
        self._token = config.token

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        call = incoming(handler_call_details.invocation_metadata)
        if self._refuses(handler_call_details.method, call.token):
            return wrap_handler(handler, _deny(handler_call_details.method, call.token))
        if call.trace_parent is None:
            return handler
        return wrap_handler(handler, _under(call.trace_parent, handler.response_streaming))

    def _refuses(self, method: str, token: str | None) -> bool:
        if self._token is None or method in UNAUTHENTICATED_METHODS:
            return False
        return token is None or not hmac.compare_digest(token.encode(), self._token.encode())


def _deny(method: str, token: str | None) -> Callable[[Behavior], Behavior]:
    reason = "no token" if token is None else "a wrong token"
    message = (
        f"{method} refused: the call carries {reason}; this kvmesh server requires the "
        "session's shared token (KVMESH_TOKEN) as metadata 'authorization: Bearer <token>'"
    )

    def deny(_behavior: Behavior) -> Behavior:
        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return refuse

    return deny


def _under(parent: Context, response_streaming: bool) -> Callable[[Behavior], Behavior]:
    """Run a behavior with the caller's span as the current parent. A streamed response is a generator that
    gRPC advances step by step, so the context is attached around each step, never across a yield."""

    def wrap(behavior: Behavior) -> Behavior:
        if not response_streaming:

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                with attached(parent):
                    return behavior(request, context)

            return unary

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with attached(parent):
                responses = iter(behavior(request, context))
            try:
                while True:
                    with attached(parent):
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                    yield response
            finally:  # the client went away mid-stream: end the handler now (its spans end under the parent too)
                close = getattr(responses, "close", None)
                if close is not None:
                    with attached(parent):
                        close()

        return streaming

    return wrap


_DETAIL_FIELDS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")


class _CallDetails(collections.namedtuple("_CallDetails", _DETAIL_FIELDS), grpc.ClientCallDetails):
    pass


class ClientCallInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config

    def _details(self, details: grpc.ClientCallDetails, default_timeout: float) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout if details.timeout is not None else default_timeout,
            (*(details.metadata or ()), *outgoing(self._config)),  # per call: the trace context is the caller's now
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def _check_size(self, details: grpc.ClientCallDetails, request: Any) -> None:
        size = request.ByteSize()
        if size > self._config.max_message_bytes:
            method = details.method.decode() if isinstance(details.method, bytes) else details.method
            raise MessageTooLargeError(f"call {method}", size, self._config.max_message_bytes)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        self._check_size(client_call_details, request)
        return continuation(self._details(client_call_details, self._config.call_deadline_s), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        self._check_size(client_call_details, request)
        return continuation(self._details(client_call_details, self._config.generate_deadline_s), request)

    # streamed requests (e.g. the reflection service): metadata and deadline; the server enforces the size
    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details, self._config.call_deadline_s), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details, self._config.generate_deadline_s), request_iterator)
