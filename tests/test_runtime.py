"""Pipelines through real Ray actors, gRPC and the real SmolLM2 worker: outputs equal the engine's own on
the same prompts, streaming, errors that name the agent and the cause, the worker's servers."""

from __future__ import annotations

import os
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from os_probes import environment, niceness, pid_listening_on

import kvmesh
from kvmesh import Agent, Pipeline, debate, run_locally, tool
from kvmesh.agents import Segment
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime import AgentError, PipelineResult, RunTimedOut
from kvmesh.runtime.events import AgentFinished, PhaseStarted, RunFinished, Token
from kvmesh.runtime.worker_actor import WORKER_SERVICE
from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvmesh.workers.engine import Engine
from kvmesh.workers.reuse_planner import PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.worker import WorkerConfig, build_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """An LLM function for run_locally: the same engine, in this process, on the same part-wise prompt ids."""
    worker = build_worker(WorkerConfig(warm_up=False), None, model=model, tokenizer=tokenizer)  # no cross-agent reuse
    engine, planner = worker.engine, worker.planner

    def llm(agent: Agent, prompt) -> str:
        parts = [
            PromptPart(p.text, segment_id(p.producer, p.text) if isinstance(p, Segment) else None) for p in prompt.parts
        ]
        ids = planner.plan(prompt.system, parts, agent.name, "prefix").token_ids
        return engine.generate([ids], SamplingParams(max_tokens=agent.max_tokens))[0].text

    return llm


def test_one_agent_answers_as_the_engine_does_and_reports_its_call(runtime_session, model, tokenizer):
    query = "What is the capital of France?"
    pipeline = Pipeline("qa", [Agent("answerer", "{query}", max_tokens=16)])
    result = runtime_session.run(pipeline, query)
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": query}]))
    expected = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=16))[0]
    assert result.outputs == {"answerer": expected.text} == {"answerer": "The capital of France is Paris."}
    (record,) = result.calls
    call = record.stats
    assert call.prompt_tokens == len(prompt) and call.output_tokens == len(expected.token_ids)
    assert call.ttft_s > 0 and record.wall_s >= call.ttft_s and call.model == "smollm2" and record.attempts == 1
    assert call.worker in {w.address for w in ray.get(runtime_session.registry.workers.remote())}
    again = runtime_session.run(pipeline, query)  # the same prompt again: its whole blocks come from the cache
    assert again.outputs == result.outputs and again.run_id != result.run_id
    assert again.calls[0].stats.cached_tokens >= 32 and again.calls[0].stats.reuse_mode == "prefix"


def test_a_three_agent_chain_gives_what_the_engine_gives_for_each_prompt(runtime_session, reference):
    pipeline = kvmesh.chain(
        "chain",
        {"planner": "Plan the answer in one line.", "writer": "Write the answer.", "editor": "Shorten the text."},
        max_tokens=8,
    )
    query = "Why do cats purr?"
    result = runtime_session.run(pipeline, query)
    expected = run_locally(pipeline, query, reference)
    assert result.history == expected.history and result.outputs == expected.outputs
    assert [c.agent for c in result.calls] == ["planner", "writer", "editor"]
    assert set(result.stats) == {"planner", "writer", "editor"}


def test_fan_out_and_in_over_two_rounds_with_prev_gives_the_engines_outputs(runtime_session, reference):
    pipeline = debate(
        "debate",
        {"pro": "Argue for it in one sentence.", "con": "Argue against it in one sentence."},
        judge=("judge", "Say who argued better."),
        rounds=2,
        max_tokens=6,
    )
    query = "Is tea better than coffee?"
    result = runtime_session.run(pipeline, query)
    expected = run_locally(pipeline, query, reference)
    assert result.rounds == 2 and len(result.history) == 3  # two rounds, then the judge's final phase
    assert result.history == expected.history and result.outputs == expected.outputs
    assert {c.agent: c.phase.final for c in result.calls if c.agent == "judge"} == {"judge": True}
    assert result.stats["pro"].calls == result.stats["con"].calls == 2


def test_an_until_loop_stops_after_the_round_that_satisfies_it(runtime_session):
    pipeline = kvmesh.self_refine(
        "refine",
        writer=("writer", "Write one line."),
        critic=("critic", "Critique it."),
        until=lambda outputs: len(outputs) == 2,  # true after the first round
        max_iters=3,
        max_tokens=4,
    )
    result = runtime_session.run(pipeline, "A line about rain.")
    assert result.rounds == 1 and len(result.calls) == 2


def test_streaming_yields_tokens_from_several_agents_as_they_decode(runtime_session):
    pipeline = kvmesh.fan_out_in(
        "fan", {"poet": "Write a poem.", "critic": "Write a review."}, ("editor", "Merge them."), max_tokens=8
    )
    events = list(runtime_session.stream(pipeline, "The sea at night."))
    assert isinstance(events[0], PhaseStarted) and isinstance(events[-1], RunFinished)
    tokens: dict[str, str] = {}
    for event in events:
        if isinstance(event, Token):
            tokens[event.agent] = tokens.get(event.agent, "") + event.text
    finished = {e.agent: e.text for e in events if isinstance(e, AgentFinished)}
    assert set(tokens) == set(finished) == {"poet", "critic", "editor"}
    assert tokens == finished  # the streamed pieces add up to each output
    done_at = {e.agent: i for i, e in enumerate(events) if isinstance(e, AgentFinished)}
    first_editor_token = next(i for i, e in enumerate(events) if isinstance(e, Token) and e.agent == "editor")
    assert first_editor_token > max(done_at["poet"], done_at["critic"])  # the editor waited for both


def test_pipeline_run_and_stream_go_through_the_runtime(runtime_session):
    pipeline = Pipeline("api", [Agent("echo", "Repeat: {query}", max_tokens=4)])
    result = pipeline.run("hello", session=runtime_session)
    assert isinstance(result, PipelineResult) and 1 <= result.stats["echo"].output_tokens <= 4
    events = list(pipeline.stream("hello", session=runtime_session))
    assert events[-1].result.outputs == result.outputs


def test_a_tool_runs_inside_the_agents_process(runtime_session, tmp_path):
    seen = tmp_path / "pids"

    @tool
    def facts(query: str) -> str:
        with open(seen, "a") as f:
            f.write(f"{os.getpid()}\n")
        return "Paris has 2.1 million inhabitants."

    pipeline = Pipeline("rag", [Agent("answerer", "{facts}\n\n{query}", max_tokens=4)], tools=[facts])
    runtime_session.run(pipeline, "How many people live in Paris?")
    (pid,) = seen.read_text().split()
    assert int(pid) != os.getpid()


def test_a_tool_error_reaches_the_caller_naming_the_agent_and_the_cause(runtime_session):
    @tool
    def lookup(query: str) -> str:
        raise ConnectionError("the index is offline")

    pipeline = Pipeline(
        "broken", [Agent("answerer", "{lookup}\n{query}", max_tokens=4), Agent("summary", "{answerer}")], tools=[lookup]
    )
    with pytest.raises(AgentError) as failed:
        runtime_session.run(pipeline, "anything")
    assert failed.value.agent == "answerer"
    message = str(failed.value)
    assert "agent 'answerer'" in message and "tool 'lookup' failed" in message
    assert "ConnectionError: the index is offline" in message


def test_an_llm_call_error_reaches_the_caller_naming_the_agent_and_the_cause(runtime_session):
    pipeline = Pipeline("long", [Agent("reader", "Summarize: {query}", max_tokens=4)])
    with pytest.raises(AgentError, match=r"agent 'reader'.*INVALID_ARGUMENT.*context is 8192"):
        runtime_session.run(pipeline, "word " * 9000)


def test_an_oversized_prompt_fails_naming_the_limit_and_the_setting(runtime_session):
    @tool
    def dump(query: str) -> str:
        return "x" * (17 << 20)

    pipeline = Pipeline("huge", [Agent("reader", "{dump}", max_tokens=4)], tools=[dump])
    with pytest.raises(AgentError, match=r"agent 'reader'.*over the limit of 16,777,216 bytes.*KVMESH_MAX_MESSAGE_MB"):
        runtime_session.run(pipeline, "q")


def test_a_run_over_its_timeout_is_cancelled_and_the_agents_serve_the_next_run(runtime_session):
    pipeline = Pipeline("slow", [Agent("writer", "Write a long story about {query}.", max_tokens=200)])
    with pytest.raises(RunTimedOut, match=r"timeout of 0.3 s.*writer"):
        runtime_session.run(pipeline, "a dragon", timeout_s=0.3)
    quick = runtime_session.run(pipeline.with_agent_options(max_tokens=3), "a dragon")
    assert quick.calls[0].stats.output_tokens == 3


def test_the_workers_server_wants_the_token_and_speaks_health_and_reflection(runtime_session):
    (worker,) = ray.get(runtime_session.registry.workers.remote())
    with grpc.insecure_channel(worker.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            worker_pb2_grpc.WorkerServiceStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):  # reflection is behind the token too
            ProtoReflectionDescriptorDatabase(channel).get_services()
    from kvmesh.runtime.grpc_client import open_channel

    with open_channel(worker.address, runtime_session.config) as channel:
        assert WORKER_SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()
        stats = worker_pb2_grpc.WorkerServiceStub(channel).Stats(worker_pb2.StatsRequest())
    assert stats.model == "smollm2" and stats.address == worker.address and stats.running == 0
    # torch computes on the node's cores (one worker here), not on Ray's 1 thread for a 0.5-CPU actor
    assert stats.threads == runtime_session.worker_threads == int(runtime_session.cluster.num_cpus)
    assert (stats.device, stats.weights) == ("cpu", "fp32")


def test_the_worker_computes_at_the_drivers_priority_and_its_threads_spin_at_barriers(runtime_session):
    """Ray would start it at niceness 15 with passive OpenMP waits: a Session's dense prefill took ~1.21x an
    in-process engine's time that way, ~1.13x this way (bench/NOTES.md, prefill parity). Agents keep the passive
    waits: they are idle."""
    worker = ray.get(runtime_session.registry.workers.remote())[0]
    pid = pid_listening_on(int(worker.address.rsplit(":", 1)[1]))
    assert niceness(pid) == niceness(os.getpid()) == 0
    env = environment(pid)
    assert env["GOMP_SPINCOUNT"] == "300000" and env["OMP_NUM_THREADS"] == str(runtime_session.worker_threads)
    pipeline = Pipeline("nice", [Agent("echo", "Repeat: {query}", max_tokens=1)])  # held: its agents live on
    agent_address = runtime_session._agents_for(pipeline).addresses["echo"]
    agent_env = environment(pid_listening_on(int(agent_address.rsplit(":", 1)[1])))
    runtime_session.release(pipeline)
    assert "GOMP_SPINCOUNT" not in agent_env and agent_env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_an_interrupt_cancels_the_run_stops_its_llm_call_and_releases_its_agents(runtime_session):
    pipeline = Pipeline("interrupted", [Agent("writer", "Write a long essay about {query}.", max_tokens=200)])
    actors = runtime_session.agent_actors(pipeline)
    stream = runtime_session.stream(pipeline, "the history of bridges")
    with pytest.raises(KeyboardInterrupt):
        for event in stream:
            if isinstance(event, Token):
                runtime_session.interrupt()  # what Ctrl-C does (Session.ctrl_c_cancels)
    assert runtime_session.agent_actors(pipeline) != actors  # released; a new run gets fresh ones
    (worker,) = ray.get(runtime_session.registry.workers.remote())
    from kvmesh.runtime.grpc_client import open_channel

    with open_channel(worker.address, runtime_session.config) as channel:
        for _ in range(50):  # the cancel reaches the engine a moment later
            stats = worker_pb2_grpc.WorkerServiceStub(channel).Stats(worker_pb2.StatsRequest())
            if stats.running == stats.waiting == 0:
                break
            time.sleep(0.1)
    assert stats.running == 0 and stats.waiting == 0  # the 200-token call stopped well before its end
