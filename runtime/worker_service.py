"""WorkerService over gRPC: an LLM call whose prompt arrives as parts, streamed back token by token.

Generate hands the prompt's parts to the reuse planner (ids part by part in the model's chat frame, and
how to serve them: prefix cache, KVCOMM-corrected segment KV, or dense), submits the result to the engine
loop under the caller's request id, streams a chunk per token and ends with a chunk carrying the call's
CallStats (built once, here, from the engine's and the planner's shares). A client that goes away (cancel,
deadline, crash) cancels the engine request. Each call is a `chat {model}` span (spans.traced_chat) under the
calling agent's span.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
import torch
from opentelemetry import trace

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine import RequestFailed
from kvmesh.workers.engine_loop import EngineLoop
from kvmesh.workers.reuse_planner import PlannedCall, ReusePlanner
from kvmesh.workers.sampling import InvalidRequestError, SamplingParams
from kvmesh.workers.scheduler import EngineOverloaded
from kvmesh.workers.worker import CallStats

from .spans import traced_chat
from .wire import call_stats_to_wire, finish_reason_to_wire
from .worker_request import worker_call


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        loop: EngineLoop,
        planner: ReusePlanner,
        model_name: str,
        address: Callable[[], str],
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.loop = loop
        self.tracer = tracer or trace.NoOpTracer()
        self.planner = planner
        self.model_name = model_name
        self._address = address  # known once the server is bound
        # the threads the worker was set up with (process-wide): read now, because the engine loop lowers torch's
        # threads around each step-graph call, and a Stats call landing then would report 1
        self._threads = torch.get_num_threads()
        self._requests_total = 0
        self._lock = threading.Lock()

    # -- Generate --------------------------------------------------------------------------------------
    def Generate(self, request: worker_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        """Chunks of text as the engine decodes, the last with CallStats. INVALID_ARGUMENT for a request the
        engine cannot serve (bad sampling, prompt longer than the context), RESOURCE_EXHAUSTED when its queue
        is full (retry later), INTERNAL when this request failed in the engine (the others went on)."""
        return traced_chat(self.tracer, request, self.model_name, self._generate(request, context))

    def _generate(self, request: worker_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        try:
            sampling, planned = self.plan(request)
        except (InvalidRequestError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = request.request_id or f"anon-{uuid.uuid4().hex}"
        stream = self.loop.submit(
            planned.token_ids, sampling, request_id, role=request.agent or None, reuse=planned.reuse
        )
        context.add_callback(stream.cancel)  # runs when the RPC ends for any reason; a no-op once finished
        with self._lock:
            self._requests_total += 1
        try:
            for event in stream:
                if not event.finished:
                    yield worker_pb2.GenerateChunk(text=event.text, token_ids=[event.token_id])
                    continue
                assert event.finish_reason is not None and event.stats is not None  # an end event carries both
                stats = CallStats.of(event.stats, planned.stats, self.model_name, self._address())
                yield worker_pb2.GenerateChunk(
                    text=event.text,
                    token_ids=[] if event.token_id is None else [event.token_id],
                    finished=True,
                    finish_reason=finish_reason_to_wire(event.finish_reason),
                    stats=call_stats_to_wire(stats),
                )
        except InvalidRequestError as exc:  # the engine refused it (e.g. longer than the context)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineOverloaded as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except RequestFailed as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))

    def plan(self, request: worker_pb2.GenerateRequest) -> tuple[SamplingParams, PlannedCall]:
        """What a Generate call samples with and how its prompt is served (benchmarks check their prompts
        against it). Raises InvalidRequestError / ValueError for a request that cannot be served."""
        call = worker_call(request)
        return call.sampling, self.planner.plan_conversation(call.system, call.turns, call.agent, call.reuse)

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
            threads=self._threads,
            device=str(engine.model.device),
            weights=engine.model.weight_format,
        )
