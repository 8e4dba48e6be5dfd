"""The door's call to a worker: routed by the session's registry, streamed over the runtime's gRPC, cancellable.

As an agent's call is (agent_runner.py): the registry picks the worker that holds the request's segments
(else the slot's previous worker, else the least loaded) and hears when the call ends, with the reply's
segment, so the next call that carries that reply goes where its KV is. The Generate stream runs on the
runtime's own channels (the session's token, TLS, deadlines) in a thread of its own that hands chunks to the
event loop; closing the stream early (a client that went away) cancels the call, and the worker cancels the
engine request and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

from .chat_request import DoorCall
from .config import RuntimeConfig
from .errors import MessageTooLargeError
from .grpc_client import Channels
from .openai_errors import SERVER_ERROR, OpenAIError, from_rpc_error
from .registry import NAMESPACE, Route, registry_name
from .reply_index import ReplyIndex, ReplyIndexConfig

_END = object()


@dataclass(frozen=True)
class DoorSettings:
    """What every replica of the door needs: the session to call into and what it serves."""

    session_id: str
    config: RuntimeConfig = field(repr=False)  # the session's: its token and TLS reach the workers
    model: str  # the id clients name in `model`
    api_key: str | None = field(default=None, repr=False)  # None: no Authorization needed (loopback only)
    replies: ReplyIndexConfig = field(default_factory=ReplyIndexConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("DoorSettings.model must name the served model")


class ChatDoor:
    def __init__(self, settings: DoorSettings) -> None:
        self.settings = settings
        self.registry = ray.get_actor(registry_name(settings.session_id), namespace=NAMESPACE)
        self.channels = Channels(settings.config)
        self.replies = ReplyIndex(settings.replies)

    async def workers(self) -> int:
        return len(await self.registry.workers.remote())

    async def generate(self, call: DoorCall) -> AsyncGenerator[worker_pb2.GenerateChunk, None]:
        """The worker's chunks, the last one finished with its CallStats; OpenAIError if the call fails."""
        key = f"openai/{call.slot}"  # the registry's affinity key: the slot's calls prefer its last worker
        routing = self.registry.route.remote(key, call.segment_ids)
        try:
            route = await routing
        except asyncio.CancelledError:  # the client went away while routing: the registry counted the call anyway
            routing.future().add_done_callback(lambda done: self._never_started(key, done))
            raise
        if route is None:
            raise OpenAIError(503, "no inference workers are registered", type=SERVER_ERROR, code="no_workers")
        for message in call.request.messages:
            for part in message.parts:
                part.segment.holder = route.holders.get(part.segment.id, "")
        rpc = None
        output_segment = None
        try:
            try:
                rpc = worker_pb2_grpc.WorkerServiceStub(self.channels.get(route.address)).Generate(call.request)
            except MessageTooLargeError as exc:  # checked before sending: the body was that big
                raise OpenAIError(413, str(exc), param="messages", code="request_too_large") from None
            chunks: asyncio.Queue[Any] = asyncio.Queue()
            threading.Thread(target=_pump, args=(rpc, chunks, asyncio.get_running_loop()), daemon=True).start()
            text: list[str] = []
            while (chunk := await chunks.get()) is not _END:
                if isinstance(chunk, grpc.RpcError):
                    raise from_rpc_error(chunk)
                text.append(chunk.text)
                if chunk.finished:
                    reply = "".join(text)
                    self.replies.add(call.slot, reply)
                    output_segment = segment_id(call.slot, reply)  # what the worker published it as
                yield chunk
        finally:
            if rpc is not None:
                rpc.cancel()  # a no-op once the call has ended; else the worker cancels the engine request
            self.registry.finished.remote(key, route.worker, output_segment)

    def _never_started(self, key: str, routed: Future[Route | None]) -> None:
        route = None if routed.exception() else routed.result()
        if route is not None:
            self.registry.finished.remote(key, route.worker, None)


def _pump(rpc: Any, chunks: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop) -> None:
    """In its own thread: the blocking gRPC stream into the event loop's queue, then _END (or the error)."""

    def put(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(chunks.put_nowait, item)

    try:
        for chunk in rpc:
            put(chunk)
    except grpc.RpcError as exc:
        put(exc)
    put(_END)
