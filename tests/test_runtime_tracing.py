"""Tracing through real actors: a 3-agent run is one trace across the driver, three agent actors and the
worker (invoke_workflow -> invoke_agent -> execute_tool / chat) with the GenAI attributes; errors are
recorded on the spans; and every process exports over OTLP/gRPC to a receiver built on the official
opentelemetry-proto TraceService. One own Session (trace "memory,otlp"), ~7 s to start."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from kvmesh import Agent, Pipeline, tool
from kvmesh.runtime import AgentError, RuntimeConfig, Session
from kvmesh.runtime.span_record import SpanRecord, children

pytestmark = pytest.mark.slow


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict, trace_pb2.Span]]:
        """(resource attributes, span proto) of everything received."""
        with self._lock:
            requests = list(self.requests)
        return [
            ({kv.key: kv.value.string_value or kv.value.int_value for kv in rs.resource.attributes}, span)
            for request in requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.endpoint = f"http://127.0.0.1:{port}"
    yield servicer
    server.stop(0)


@pytest.fixture(scope="module")
def traced_session(ray_cluster, receiver):
    otel = (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint),  # http:// = plaintext, as the SDK reads it
        ("OTEL_SERVICE_NAME", "kvmesh-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    )
    config = RuntimeConfig(token="kvmesh-test-token", trace="memory,otlp", trace_env=otel, redis_url="memory")
    session = Session(workers=1, config=config)
    yield session
    session.close()


def run_trace(session: Session, run_id: str) -> tuple[SpanRecord, list[SpanRecord]]:
    spans = session.finished_spans()
    (root,) = [s for s in spans if s.attributes.get("kvmesh.run_id") == run_id]
    return root, [s for s in spans if s.trace_id == root.trace_id]


def test_a_three_agent_run_is_one_trace_across_the_driver_agents_and_worker(traced_session):
    @tool
    def notes(query: str) -> str:
        return "Cats purr when content."

    pipeline = Pipeline(
        "traced",
        [
            Agent("planner", "Plan in one line. {notes} {query}", max_tokens=3),
            Agent("writer", "Write it. {planner}", max_tokens=3),
            Agent("editor", "Shorten it. {writer}", max_tokens=3),
        ],
        tools=[notes],
    )
    result = traced_session.run(pipeline, "Why do cats purr?")
    root, spans = run_trace(traced_session, result.run_id)

    assert root.name == "invoke_workflow traced" and root.parent_id is None and root.status == "UNSET"
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["gen_ai.usage.output_tokens"] == sum(c.stats.output_tokens for c in result.calls)
    agents = children(spans, root)
    assert [s.name for s in agents] == ["invoke_agent planner", "invoke_agent writer", "invoke_agent editor"]
    records = {c.agent: c.stats for c in result.calls}
    worker_pids = set()
    for span in agents:
        name = span.attributes["gen_ai.agent.name"]
        record = records[name]
        below = children(spans, span)
        chats = [s for s in below if s.name == "chat smollm2"]
        assert len(chats) == 1, [s.name for s in below]
        (chat,) = chats
        assert [s.name for s in below if s is not chat] == (["execute_tool notes"] if name == "planner" else [])
        assert span.attributes["gen_ai.operation.name"] == "invoke_agent" and span.attributes["kvmesh.attempts"] == 1
        assert span.attributes["gen_ai.workflow.name"] == "traced"
        for s in (span, chat):  # the agent's span and its LLM call report the figures of the call's CallStats
            assert s.attributes["gen_ai.usage.input_tokens"] == record.prompt_tokens
            assert s.attributes["gen_ai.usage.output_tokens"] == record.output_tokens
            assert s.attributes["gen_ai.usage.cache_read.input_tokens"] == record.cached_tokens + record.reused_tokens
            assert s.attributes["kvmesh.reuse.mode"] == record.reuse_mode
            assert s.attributes["kvmesh.ttft_s"] == pytest.approx(record.ttft_s)
            assert s.attributes["kvmesh.worker"] == record.worker
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.request.model"] == "smollm2" and chat.attributes["gen_ai.agent.name"] == name
        assert chat.attributes["gen_ai.request.max_tokens"] == 3
        assert chat.attributes["gen_ai.response.finish_reasons"] == ["length"]
        assert "kvmesh.spec.drafted_tokens" in chat.attributes and "kvmesh.reuse.recomputed_tokens" in chat.attributes
        # each span where its work happened: the agent's own actor, the worker's actor
        assert span.resource["kvmesh.process"].endswith(f"/{name}") and chat.resource["kvmesh.process"] == "worker-0"
        assert span.resource["process.pid"] != root.resource["process.pid"]
        worker_pids.add(chat.resource["process.pid"])
        assert root.start_ns <= span.start_ns <= chat.start_ns <= chat.end_ns <= span.end_ns
    assert len({s.resource["process.pid"] for s in agents}) == 3 and len(worker_pids) == 1
    assert root.resource["kvmesh.process"] == "driver" and root.resource["service.name"] == "kvmesh-test"
    assert len(spans) == 1 + 3 + 3 + 1  # nothing else in the trace


def test_errors_are_recorded_on_the_spans_of_the_failing_tool_agent_and_run(traced_session):
    @tool
    def lookup(query: str) -> str:
        raise ValueError("index offline")

    pipeline = Pipeline("broken", [Agent("reader", "{lookup} {query}", max_tokens=2)], tools=[lookup])
    with pytest.raises(AgentError, match="index offline"):
        traced_session.run(pipeline, "anything")
    spans = traced_session.finished_spans()
    by_name = {s.name: s for s in spans if s.name.endswith(("broken", "reader", "lookup"))}
    assert set(by_name) == {"invoke_workflow broken", "invoke_agent reader", "execute_tool lookup"}
    for span in by_name.values():
        assert span.status == "ERROR" and "index offline" in span.status_message
        assert [name for name, _ in span.events] == ["exception"]
    assert by_name["execute_tool lookup"].attributes["error.type"] == "ValueError"
    assert by_name["execute_tool lookup"].attributes["gen_ai.tool.name"] == "lookup"
    assert by_name["invoke_workflow broken"].attributes["error.type"] == "AgentError"
    assert len({s.trace_id for s in by_name.values()}) == 1


def test_every_process_exports_its_spans_over_otlp_grpc(traced_session, receiver):
    pipeline = Pipeline("exported", [Agent("solo", "{query}", max_tokens=1)])
    result = traced_session.run(pipeline, "Say hi.")
    assert traced_session.flush_traces()
    root_name = "invoke_workflow exported"
    deadline = time.monotonic() + 10
    while True:  # flushed means sent; the receiver may still be storing the last request
        spans = receiver.spans()
        roots = [s for _, s in spans if s.name == root_name and _attribute(s, "kvmesh.run_id") == result.run_id]
        received = [(r, s) for r, s in spans if roots and s.trace_id == roots[0].trace_id]
        if len(received) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    names = {span.name: (resource, span) for resource, span in received}
    assert set(names) == {root_name, "invoke_agent solo", "chat smollm2"}
    (_, root), (agent_resource, agent), (_, chat) = (names[n] for n in (root_name, "invoke_agent solo", "chat smollm2"))
    assert not root.parent_span_id and agent.parent_span_id == root.span_id and chat.parent_span_id == agent.span_id
    assert _attribute(chat, "gen_ai.usage.output_tokens") == result.calls[0].stats.output_tokens
    assert _attribute(chat, "gen_ai.operation.name") == "chat"
    assert _attribute(agent, "gen_ai.agent.name") == "solo"
    assert agent_resource["kvmesh.process"].endswith("/solo")  # three processes, each exporting its own spans
    assert {r["kvmesh.process"] for r, _ in received} == {"driver", agent_resource["kvmesh.process"], "worker-0"}
    assert all(r["service.name"] == "kvmesh-test" for r, _ in received)


def _attribute(span, key: str):
    for kv in span.attributes:
        if kv.key == key:
            value = kv.value
            return getattr(value, value.WhichOneof("value"))
    return None
