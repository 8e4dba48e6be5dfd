"""Tracing without Ray: the setting, W3C trace context through real kvmesh gRPC servers (unary and streamed
calls), and the chat span a worker's Generate stream is wrapped in."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace

from kvmesh.runtime import tracing
from kvmesh.runtime.agent_actor import AGENT_SERVICE
from kvmesh.runtime.config import ConfigError, RuntimeConfig
from kvmesh.runtime.grpc_client import open_channel
from kvmesh.runtime.grpc_server import start_server
from kvmesh.runtime.spans import traced_chat
from kvmesh.runtime.wire import call_stats_to_wire, finish_reason_to_wire
from kvmesh.runtime.worker_actor import WORKER_SERVICE
from kvmesh.v1 import agent_pb2, agent_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.workers.worker import CallStats

MEMORY = RuntimeConfig(trace="memory", token="t0ken")


def test_the_trace_setting_names_exporters_and_refuses_unknown_ones(monkeypatch):
    assert RuntimeConfig(trace="otlp, memory").trace_exporters == {"otlp", "memory"}
    assert RuntimeConfig(trace="off").trace_exporters == frozenset()
    monkeypatch.setenv("KVMESH_TRACE", "console")
    assert RuntimeConfig().trace_exporters == {"console"}
    with pytest.raises(ConfigError, match=r"KVMESH_TRACE.*jaeger.*console, otlp, memory"):
        RuntimeConfig(trace="otlp,jaeger")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc")
    assert ("OTEL_SERVICE_NAME", "svc") in RuntimeConfig().trace_env  # the driver's settings travel along
    assert "svc" not in repr(RuntimeConfig())  # OTEL headers may hold keys: not in the repr
    assert isinstance(tracing.tracer(RuntimeConfig(trace="off")), trace.NoOpTracer)


class _Seen(agent_pb2_grpc.AgentServiceServicer, worker_pb2_grpc.WorkerServiceServicer):
    """Records, per call, the current span's context and whether the metadata had a traceparent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, trace.SpanContext, bool]] = []

    def _note(self, what: str, context: grpc.ServicerContext) -> None:
        keys = {key for key, _ in context.invocation_metadata()}
        self.seen.append((what, trace.get_current_span().get_span_context(), "traceparent" in keys))

    def Deliver(self, request, context):
        self._note("deliver", context)
        return agent_pb2.Ack()

    def Generate(self, request, context):
        for i in range(2):  # each step of a streamed response runs under the caller's context
            self._note(f"chunk {i}", context)
            yield worker_pb2.GenerateChunk(text=str(i), finished=i == 1)


@pytest.fixture
def traced_server():
    seen = _Seen()
    server = start_server(
        MEMORY,
        {
            AGENT_SERVICE: lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(seen, s),
            WORKER_SERVICE: lambda s: worker_pb2_grpc.add_WorkerServiceServicer_to_server(seen, s),
        },
        "traced",
    )
    channel = open_channel(server.address, MEMORY)
    yield seen, channel
    channel.close()
    server.stop(grace_s=0)


def test_trace_context_crosses_unary_and_streamed_calls_and_is_absent_outside_a_span(traced_server):
    seen, channel = traced_server
    agent = agent_pb2_grpc.AgentServiceStub(channel)
    worker = worker_pb2_grpc.WorkerServiceStub(channel)
    agent.Deliver(agent_pb2.Message())  # no span current: nothing to carry
    assert seen.seen == [("deliver", trace.INVALID_SPAN_CONTEXT, False)]
    seen.seen.clear()
    with tracing.tracer(MEMORY).start_as_current_span("caller") as caller:
        agent.Deliver(agent_pb2.Message())
        chunks = list(worker.Generate(worker_pb2.GenerateRequest()))
    assert [c.text for c in chunks] == ["0", "1"]
    expected = caller.get_span_context()
    assert [what for what, _, _ in seen.seen] == ["deliver", "chunk 0", "chunk 1"]
    for _, context, carried in seen.seen:  # the server's current span is the caller's, as a remote parent
        assert carried and context.is_remote
        assert (context.trace_id, context.span_id) == (expected.trace_id, expected.span_id)


def _chunks(finish: str = "stop", fail: bool = False):
    stats = CallStats(
        prompt_tokens=40,
        cached_tokens=16,
        reused_tokens=8,
        recomputed_tokens=16,
        output_tokens=2,
        ttft_s=0.05,
        drafted_tokens=3,
        accepted_tokens=1,
        reuse_mode="kvcomm",
        model="smollm2",
        worker="127.0.0.1:1",
        anchors_consulted=5,
        segment_modes={"s2": "kvcomm", "s1": "dense"},
        segment_reasons={"s2": "vouched for by 5 anchors", "s1": "nearest anchor is 0.70 away (> 0.5)"},
        degradations=("KV store unavailable: Redis is unreachable",),
    )
    yield worker_pb2.GenerateChunk(text="a")
    if fail:
        raise RuntimeError("engine fault")
    yield worker_pb2.GenerateChunk(
        text="b", finished=True, finish_reason=finish_reason_to_wire(finish), stats=call_stats_to_wire(stats)
    )


def _request() -> worker_pb2.GenerateRequest:
    sampling = worker_pb2.Sampling(max_tokens=2, temperature=0.0, top_p=0.9)
    return worker_pb2.GenerateRequest(request_id="r1", agent="writer", sampling=sampling)  # reuse unset: auto


def test_a_chat_span_carries_the_genai_and_kvmesh_attributes_of_the_call():
    tracer = tracing.tracer(MEMORY)
    tracing.finished_spans()  # start clean
    assert [c.text for c in traced_chat(tracer, _request(), "smollm2", _chunks("length"))] == ["a", "b"]
    (span,) = tracing.finished_spans()
    assert span.name == "chat smollm2" and span.kind == "INTERNAL" and span.status == "UNSET"
    assert span.attributes == span.attributes | {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "kvmesh",
        "gen_ai.request.model": "smollm2",
        "gen_ai.agent.name": "writer",
        "kvmesh.reuse.requested": "auto",
        "gen_ai.request.max_tokens": 2,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": pytest.approx(0.9),
        "gen_ai.usage.input_tokens": 40,
        "gen_ai.usage.output_tokens": 2,
        "gen_ai.usage.cache_read.input_tokens": 24,  # prefix hits + spliced segment KV
        "gen_ai.response.finish_reasons": ["length"],
        "kvmesh.reuse.mode": "kvcomm",
        "kvmesh.reuse.reused_tokens": 8,
        "kvmesh.reuse.recomputed_tokens": 16,
        "kvmesh.reuse.anchors_consulted": 5,
        "kvmesh.reuse.segment_modes": ["s1=dense", "s2=kvcomm"],
        "kvmesh.reuse.segment_reasons": ["s1=nearest anchor is 0.70 away (> 0.5)", "s2=vouched for by 5 anchors"],
        "kvmesh.degradations": ["KV store unavailable: Redis is unreachable"],
        "kvmesh.ttft_s": pytest.approx(0.05),
        "kvmesh.spec.drafted_tokens": 3,
        "kvmesh.spec.accepted_tokens": 1,
        "kvmesh.worker": "127.0.0.1:1",
    }
    assert 0 <= span.attributes["gen_ai.response.time_to_first_chunk"] <= span.duration_s
    assert span.events == (
        ("kvmesh.degraded", {"kvmesh.degradation": "KV store unavailable: Redis is unreachable"}),
        ("kvmesh.final_chunk", {}),
    )
    assert span.resource["service.name"] == "kvmesh" and span.resource["kvmesh.process"] == "driver"


def test_a_failed_or_abandoned_chat_stream_ends_its_span_saying_so():
    tracer = tracing.tracer(MEMORY)
    tracing.finished_spans()
    with pytest.raises(RuntimeError, match="engine fault"):
        list(traced_chat(tracer, _request(), "smollm2", _chunks(fail=True)))
    stream = traced_chat(tracer, _request(), "smollm2", _chunks())
    next(stream)
    stream.close()  # what gRPC does when the client goes away mid-stream
    failed, abandoned = tracing.finished_spans()
    assert failed.status == "ERROR" and "engine fault" in failed.status_message
    assert failed.attributes["error.type"] == "RuntimeError"
    assert [name for name, _ in failed.events] == ["exception"]
    assert failed.events[0][1]["exception.message"] == "engine fault"
    assert abandoned.status == "UNSET" and abandoned.attributes["gen_ai.response.finish_reasons"] == ["cancelled"]


def test_the_memory_exporter_keeps_the_newest_spans_only():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from kvmesh.runtime.tracing import _RecentSpans

    recent = _RecentSpans(limit=3)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(recent))
    for n in range(5):
        provider.get_tracer("t").start_span(f"s{n}").end()
    assert [span.name for span in recent.take(clear=True)] == ["s2", "s3", "s4"] and recent.dropped == 2
    assert recent.take(clear=False) == []
