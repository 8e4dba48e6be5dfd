"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status, from any cause.

Clients (the openai library, LangChain) read `type` and `code` to decide what to do: a 4xx is the request's
fault and is not retried, a 429 or 5xx is retried with backoff. So the worker's gRPC status is mapped with
that in mind: INVALID_ARGUMENT is the caller's (400), a full queue or a worker that is gone is the server's
(503, retried), a deadline is 504.
"""

from __future__ import annotations

from typing import Any

import grpc

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,  # the field's name in OpenAI's schema
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, what: str) -> OpenAIError:
    """A field this server cannot honour: refused, never ignored."""
    return OpenAIError(400, f"{param}: {what}", param=param, code="unsupported_parameter")


_SERVER_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "overloaded", "the inference worker's queue is full; retry later"),
    grpc.StatusCode.UNAVAILABLE: (503, "worker_unavailable", "the inference worker is not reachable (restarting?)"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "the inference worker did not finish within the deadline"),
}


def from_rpc_error(exc: grpc.RpcError) -> OpenAIError:
    """The worker's answer to Generate as the HTTP client should see it (no internal addresses)."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        too_long = "context" in details and "prompt has" in details
        return OpenAIError(
            400, details, param="messages" if too_long else None, code="context_length_exceeded" if too_long else None
        )
    status, error_code, hint = _SERVER_STATUS.get(code, (500, "worker_error", "the inference worker failed"))
    return OpenAIError(status, f"{hint} ({code.name}: {details})", type=SERVER_ERROR, code=error_code)
