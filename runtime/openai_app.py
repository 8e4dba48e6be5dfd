"""The OpenAI-compatible HTTP API over a ChatDoor: a FastAPI app, the same for every replica.

GET /health, GET /v1/models[/{id}], POST /v1/chat/completions (JSON, or server-sent events with `stream`).
With an API key, /v1/* requires `Authorization: Bearer <key>` (compared in constant time); /health tells
only whether workers are registered. Every error is an OpenAI error object (openai_errors.py). A streamed
call's first chunk is awaited before the response starts, so a request the worker refuses (a prompt over the
context) is a plain 400, not an error inside a 200 stream.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from kvmesh.v1 import worker_pb2

from .chat_door import ChatDoor
from .chat_request import door_call
from .openai_errors import SERVER_ERROR, OpenAIError
from .openai_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    KvmeshStats,
    Model,
    ModelList,
    Usage,
    parse_request,
)
from .wire import call_stats_from_wire, finish_reason_from_wire

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(door: ChatDoor) -> FastAPI:
    settings = door.settings
    created = int(time.time())
    model = Model(id=settings.model, created=created)
    app = FastAPI(title="kvmesh", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        error = OpenAIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            what = "no API key" if not given else "a wrong API key"
            raise OpenAIError(
                401,
                f"the request carries {what}; send 'Authorization: Bearer <key>' with the key "
                "the server was started with (--api-key / KVMESH_API_KEY)",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = await door.workers()
        return JSONResponse(
            {"status": "ok" if workers else "no workers", "workers": workers}, status_code=200 if workers else 503
        )

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[model])

    @v1.get("/models/{model_id:path}")
    async def one_model(model_id: str) -> Model:
        _check_model(model_id, settings.model)
        return model

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(await request.body())
        _check_model(body.model, settings.model)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        call = door_call(body, door.replies, completion_id)
        chunks = door.generate(call)
        first = await _first(chunks)  # raises OpenAIError before any byte is sent
        if body.stream:
            events = _stream(body, completion_id, settings.model, call.slot, first, chunks)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        text = [first.text]
        final = first
        async with contextlib.aclosing(chunks):  # cancelled (the client went away): the call is cancelled too
            async for chunk in chunks:
                text.append(chunk.text)
                final = chunk
        stats = call_stats_from_wire(final.stats)
        return JSONResponse(
            ChatCompletion(
                id=completion_id,
                created=int(time.time()),
                model=settings.model,
                choices=[
                    Choice(
                        message=AssistantMessage(content="".join(text)),
                        finish_reason=finish_reason_from_wire(final.finish_reason),
                    )
                ],
                usage=Usage.of(stats),
                kvmesh=KvmeshStats.of(stats, call.slot),
            ).model_dump(mode="json")
        )

    app.include_router(v1)
    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise OpenAIError(
            404,
            f"the model {name!r} does not exist here; this server serves {served!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


async def _first(chunks: AsyncGenerator[worker_pb2.GenerateChunk, None]) -> worker_pb2.GenerateChunk:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        raise OpenAIError(502, "the inference worker ended the call without a reply", type=SERVER_ERROR) from None


async def _stream(
    body: ChatCompletionRequest,
    completion_id: str,
    model: str,
    slot: str,
    first: worker_pb2.GenerateChunk,
    chunks: AsyncGenerator[worker_pb2.GenerateChunk, None],
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: the role, the text as it decodes, the finish reason, then with
    stream_options.include_usage a chunk with `usage` (and `kvmesh`) and no choices; then [DONE]. Without
    include_usage, `kvmesh` rides on the finish-reason chunk."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    created = int(time.time())

    def event(choices: list[ChunkChoice], **extra: object) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, **extra)
        fields = chunk.model_dump(mode="json")
        for choice in fields["choices"]:  # a delta holds only what it adds; finish_reason and logprobs stay null
            choice["delta"] = {name: value for name, value in choice["delta"].items() if value is not None}
        if not include_usage:  # OpenAI's chunks carry `usage` (null until the last) only when it was asked for
            del fields["usage"]
        if fields["kvmesh"] is None:
            del fields["kvmesh"]
        return f"data: {_json(fields)}\n\n"

    yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
    try:
        chunk = first
        while True:
            if chunk.text:
                yield event([ChunkChoice(delta=Delta(content=chunk.text))])
            if chunk.finished:
                stats = call_stats_from_wire(chunk.stats)
                kvmesh = KvmeshStats.of(stats, slot)
                reason = finish_reason_from_wire(chunk.finish_reason)
                yield event(
                    [ChunkChoice(delta=Delta(), finish_reason=reason)], kvmesh=None if include_usage else kvmesh
                )
                if include_usage:
                    yield event([], usage=Usage.of(stats), kvmesh=kvmesh)
                break
            chunk = await anext(chunks)
    except OpenAIError as exc:  # mid-stream: the status line is long gone; OpenAI's clients read this
        yield f"data: {_json(exc.body())}\n\n"
    finally:  # also when the client went away mid-stream: the worker's call is cancelled, its KV freed
        await chunks.aclose()
    yield "data: [DONE]\n\n"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
