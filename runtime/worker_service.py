"""WorkerService over gRPC: an LLM call whose prompt arrives as parts, streamed back token by token.

Generate assembles the prompt's ids part by part (prompt_ids.ChatFramer), submits it to the engine
loop under the caller's request id, streams a chunk per token and ends with a chunk carrying the call's
CallStats. A client that goes away (cancel, deadline, crash) cancels the engine request.
"""

from __future__ import annotations

import inspect
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine_loop import EngineLoop, RequestStream
from kvmesh.workers.sampling import InvalidRequestError, SamplingParams

from .prompt_ids import ChatFramer, PromptIds, PromptPiece


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, loop: EngineLoop, model_name: str, address: Callable[[], str]) -> None:
        self.loop = loop
        self.model_name = model_name
        self._address = address  # known once the server is bound
        self.framer = ChatFramer(loop.engine.tokenizer)
        self._requests_total = 0
        self._lock = threading.Lock()
        # the engine learns agent roles (per-role speculation) through submit(role=) where it takes one
        self._takes_role = "role" in inspect.signature(loop.submit).parameters

    # -- Generate --------------------------------------------------------------------------------------
    def Generate(self, request: worker_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        """Chunks of text as the engine decodes, the last with CallStats. INVALID_ARGUMENT for a request the
        engine cannot serve (bad sampling, prompt longer than the context). The one place a worker's
        inference span would wrap an LLM call."""
        try:
            prompt = self._prompt(request)
            sampling = _sampling(request.sampling)
        except (InvalidRequestError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = request.request_id or f"anon-{uuid.uuid4().hex}"
        stream = self._submit(prompt, sampling, request_id, request.agent)
        context.add_callback(stream.cancel)  # runs when the RPC ends for any reason; a no-op once finished
        with self._lock:
            self._requests_total += 1
        try:
            for event in stream:
                if not event.finished:
                    yield worker_pb2.GenerateChunk(text=event.text, token_ids=[event.token_id])
                    continue
                yield worker_pb2.GenerateChunk(
                    text=event.text,
                    token_ids=[] if event.token_id is None else [event.token_id],
                    finished=True,
                    finish_reason=event.finish_reason or "",
                    stats=self._stats(event.stats),
                )
        except InvalidRequestError as exc:  # the engine refused it (e.g. longer than the context)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _prompt(self, request: worker_pb2.GenerateRequest) -> PromptIds:
        pieces = []
        for part in request.parts:
            if part.WhichOneof("kind") == "segment":
                pieces.append(PromptPiece(part.segment.text, part.segment.id or part.segment.placeholder))
            else:
                pieces.append(PromptPiece(part.text))
        return self.framer.build(request.system if request.HasField("system") else None, pieces)

    def _submit(self, prompt: PromptIds, sampling: SamplingParams, request_id: str, agent: str) -> RequestStream:
        if self._takes_role and agent:
            return self.loop.submit(prompt.ids, sampling, request_id, role=agent)  # type: ignore[call-arg]
        return self.loop.submit(prompt.ids, sampling, request_id)

    def _stats(self, stats: object) -> worker_pb2.CallStats:
        """The engine's RequestStats as CallStats. reuse_mode says what served the prompt, as observed."""
        if stats is None:
            return worker_pb2.CallStats(model=self.model_name, worker=self._address())
        prompt_tokens = int(stats.prompt_tokens)
        cached = int(stats.prefix_hit_tokens)
        return worker_pb2.CallStats(
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            recomputed_tokens=prompt_tokens - cached,
            output_tokens=int(stats.output_tokens),
            ttft_s=stats.ttft_s or 0.0,
            decode_tok_s=stats.decode_tok_s or 0.0,
            drafted_tokens=int(getattr(stats, "drafted_tokens", 0)),
            accepted_tokens=int(getattr(stats, "accepted_tokens", 0)),
            reuse_mode="prefix" if cached else "dense",
            model=self.model_name,
            worker=self._address(),
        )

    # -- Stats -----------------------------------------------------------------------------------------
    def Stats(self, request: worker_pb2.StatsRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerStats:
        engine = self.loop.engine
        scheduler = engine.scheduler  # read without the loop's thread: lengths only, a snapshot
        with self._lock:
            total = self._requests_total
        return worker_pb2.WorkerStats(
            model=self.model_name,
            address=self._address(),
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            requests_total=total,
            prefix_cache_bytes=engine.prefix_cache.nbytes if engine.prefix_cache is not None else 0,
        )


def _sampling(sampling: worker_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=int(sampling.max_tokens) or 256,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p) or 1.0,
        seed=int(sampling.seed) if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )
