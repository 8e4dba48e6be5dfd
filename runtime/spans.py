"""kvmesh's spans in the OpenTelemetry GenAI vocabulary (semantic conventions, status Development).

    invoke_workflow {pipeline}     the driver, one per run: the root of the run's trace
      invoke_agent {agent}         each agent call, in the agent's actor (parent: the START's context)
        execute_tool {tool}        each tool the agent's template calls, in the same process
        chat {model}               the LLM call, in the worker's actor (parent: the agent's Generate call)

Attributes: gen_ai.* where the conventions name the thing (operation, agent, workflow, model, request
parameters, usage, finish reasons), kvmesh.* for the rest (reuse mode, reused/recomputed tokens, anchors
consulted and what served each segment, TTFT, drafted/accepted tokens, worker, attempts). Usage comes
from the worker's CallStats, the same record as PipelineResult.calls carry. All spans are INTERNAL: each is
the work itself, in its own process; the gRPC hops between them are not spans of their own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from kvmesh.agents import Agent, Phase, Tool
from kvmesh.v1 import worker_pb2
from kvmesh.workers.worker import CallStats

from .tracing import record_error
from .wire import call_stats_from_wire, finish_reason_from_wire, reuse_mode_from_wire

PROVIDER = "kvmesh"  # gen_ai.provider.name: kvmesh serves the model itself


def workflow_span(tracer: trace.Tracer, pipeline: str, run_id: str, agents: int) -> trace.Span:
    """The run's root span; not made current (the run loop is a generator: it activates it per send)."""
    return tracer.start_span(
        f"invoke_workflow {pipeline}",
        kind=SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": pipeline,
            "gen_ai.conversation.id": run_id,
            "kvmesh.run_id": run_id,
            "kvmesh.agents": agents,
        },
    )


def end_workflow(span: trace.Span, calls: list[CallStats], rounds: int) -> None:
    span.set_attributes(_usage_totals(calls) | {"kvmesh.calls": len(calls), "kvmesh.rounds": rounds})


def agent_span(
    tracer: trace.Tracer, agent: Agent, agent_id: str, workflow: str, run_id: str, phase: Phase
) -> trace.Span:
    """An agent's call; made current by the caller, so its tools' and worker's spans nest under it."""
    return tracer.start_span(
        f"invoke_agent {agent.name}",
        kind=SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent.name,
            "gen_ai.agent.id": agent_id,
            "gen_ai.workflow.name": workflow,
            "gen_ai.conversation.id": run_id,
            "kvmesh.phase": str(phase),
            **_request_attributes(agent.max_tokens, agent.temperature, agent.top_p),
        },
    )


def end_agent(span: trace.Span, stats: CallStats, wall_s: float, attempts: int) -> None:
    span.set_attributes(_call_attributes(stats) | {"kvmesh.attempts": attempts, "kvmesh.wall_s": wall_s})


def traced_tool(tool: Tool, tracer: trace.Tracer) -> Tool:
    """The same tool, its function wrapped in an `execute_tool {tool}` span (signature kept for its inputs)."""

    @functools.wraps(tool.fn)
    def call(*args: Any, **kwargs: Any) -> object:
        with tracer.start_as_current_span(
            f"execute_tool {tool.name}",
            kind=SpanKind.INTERNAL,
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool.name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return tool.fn(*args, **kwargs)
            except Exception as exc:
                record_error(span, exc)
                raise

    return Tool(tool.name, call)


def traced_chat(
    tracer: trace.Tracer, request: worker_pb2.GenerateRequest, model: str, chunks: Iterator[worker_pb2.GenerateChunk]
) -> Iterator[worker_pb2.GenerateChunk]:
    """A worker's Generate stream inside a `chat {model}` span, which takes its usage from the final chunk.
    Parent: the context current when the stream starts (the interceptor attaches the caller's)."""
    sampling = request.sampling
    span = tracer.start_span(
        f"chat {model}",
        kind=SpanKind.INTERNAL,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.agent.name": request.agent,
            "kvmesh.request_id": request.request_id,
            "kvmesh.reuse.requested": reuse_mode_from_wire(request.reuse),
            **_request_attributes(sampling.max_tokens, sampling.temperature, sampling.top_p),
        },
    )
    started = time.perf_counter()
    first = True
    try:
        for chunk in chunks:
            if first:  # as the worker's gRPC layer sees it: planning and queueing included
                span.set_attribute("gen_ai.response.time_to_first_chunk", time.perf_counter() - started)
                first = False
            if chunk.finished:
                stats = call_stats_from_wire(chunk.stats)
                span.set_attributes(
                    _call_attributes(stats)
                    | {
                        "gen_ai.response.model": stats.model or model,
                        "gen_ai.response.finish_reasons": [finish_reason_from_wire(chunk.finish_reason) or "stop"],
                    }
                )
                for degradation in stats.degradations:  # survived, but the user should hear of it
                    span.add_event("kvmesh.degraded", {"kvmesh.degradation": degradation})
                span.add_event("kvmesh.final_chunk")  # what follows is the stream's end, not the engine
            yield chunk
    except GeneratorExit:  # the client went away (cancel, deadline): not an error of the worker's
        span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])
        raise
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        span.end()


def _request_attributes(max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    return {
        "gen_ai.request.max_tokens": int(max_tokens),
        "gen_ai.request.temperature": float(temperature),
        "gen_ai.request.top_p": float(top_p) or 1.0,
    }


def _call_attributes(stats: CallStats) -> dict[str, Any]:
    """What one LLM call cost, as the worker reported it. cache_read counts every prompt token whose KV was
    read rather than computed: exact prefix hits and spliced segments (the conventions include it in input)."""
    return {
        "gen_ai.request.model": stats.model,
        "gen_ai.usage.input_tokens": stats.prompt_tokens,
        "gen_ai.usage.output_tokens": stats.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": stats.cached_tokens + stats.reused_tokens,
        "kvmesh.reuse.mode": stats.reuse_mode,
        "kvmesh.reuse.cached_tokens": stats.cached_tokens,
        "kvmesh.reuse.reused_tokens": stats.reused_tokens,
        "kvmesh.reuse.recomputed_tokens": stats.recomputed_tokens,
        "kvmesh.reuse.anchors_consulted": stats.anchors_consulted,
        # what served each segment's KV; attribute values cannot be maps, so "segment id=mode" strings
        "kvmesh.reuse.segment_modes": [f"{key}={mode}" for key, mode in sorted(stats.segment_modes.items())],
        "kvmesh.reuse.segment_reasons": [f"{key}={why}" for key, why in sorted(stats.segment_reasons.items())],
        "kvmesh.degradations": list(stats.degradations),
        "kvmesh.ttft_s": stats.ttft_s,
        "kvmesh.decode_tok_s": stats.decode_tok_s,
        "kvmesh.spec.drafted_tokens": stats.drafted_tokens,
        "kvmesh.spec.accepted_tokens": stats.accepted_tokens,
        "kvmesh.worker": stats.worker,
    }


def _usage_totals(calls: list[CallStats]) -> dict[str, Any]:
    return {
        "gen_ai.usage.input_tokens": sum(s.prompt_tokens for s in calls),
        "gen_ai.usage.output_tokens": sum(s.output_tokens for s in calls),
        "gen_ai.usage.cache_read.input_tokens": sum(s.cached_tokens + s.reused_tokens for s in calls),
    }
