"""Driving one run from the driver: the RunState machine, phase by phase, over the agents' actors.

For each phase: START to every agent of the phase (inputs no same-phase agent produces, whom to wait
for, whom to deliver to), then collect what they send back until every agent of the phase has
delivered its OUTPUT; record, advance (rounds, until/max_iters), next phase. An ERROR ends the run
with AgentError naming the agent; so does an agent whose actor stops answering. However the run
ends early (error, timeout, Ctrl-C, the caller dropping the stream), its agents get CANCEL.

The run is one trace: its `invoke_workflow` span is current while each START is sent, so every agent's
span (and through it every LLM call's) descends from it.
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc

from kvmesh.agents import Phase, Pipeline, RunState
from kvmesh.v1 import agent_pb2, agent_pb2_grpc

from .call_metadata import from_driver
from .driver_sink import INTERRUPT, DriverSink
from .errors import AgentDiedError, AgentError, RunTimedOut, RuntimeFailure
from .events import AgentFinished, PhaseStarted, Retried, RunFinished, StreamEvent, Token
from .grpc_client import Channels, describe_rpc_error
from .results import CallRecord, PipelineResult
from .spans import end_workflow, workflow_span
from .tracing import activated, record_error, tracer
from .wire import DRIVER, Kind, call_stats_from_wire, message, phase_of

LIVENESS_POLL_S = 2.0  # with no message for this long, check the pending agents still answer


@dataclass
class RunSpec:
    pipeline: Pipeline
    query: str
    agents: Mapping[str, str]  # agent name -> address of its actor
    driver: str  # the sink's address
    driver_key: str  # the session driver's own secret: agents take START and CANCEL only with it
    stream: bool = False
    timeout_s: float | None = None  # the whole run; None: no limit (each call still has its deadline)


def new_run_id() -> str:
    return uuid.uuid4().hex  # globally unique: runs of many drivers share agents and workers


def drive(spec: RunSpec, sink: DriverSink, channels: Channels) -> Iterator[StreamEvent]:
    """Run the pipeline; yields events (tokens only when spec.stream) and finally RunFinished."""
    state = RunState(spec.pipeline, spec.query)  # validates the query before the run is registered
    run_id = new_run_id()
    inbox = sink.open(run_id)
    started = time.perf_counter()
    deadline = None if spec.timeout_s is None else started + spec.timeout_s
    calls: list[CallRecord] = []
    span = workflow_span(tracer(channels.config), spec.pipeline.name, run_id, len(spec.pipeline.agents))
    finished = False
    try:
        while state.phase is not None:
            phase = state.phase
            names = state.phase_agents()
            yield PhaseStarted(phase, tuple(names))
            with activated(span):  # never across a yield: the caller's code between events is not in the run
                for name in names:
                    _send(spec, channels, name, _start(spec, state, run_id, name))
            pending = set(names)
            while pending:
                msg = _next(spec, channels, inbox, pending, deadline)
                if msg is INTERRUPT:
                    raise KeyboardInterrupt
                agent = msg.source
                if msg.kind == Kind.TOKEN:
                    yield Token(agent, phase_of(msg), msg.text)
                elif msg.kind == Kind.RETRY:
                    yield Retried(agent, phase_of(msg), msg.text)
                elif msg.kind == Kind.ERROR:
                    raise AgentError(agent, msg.text, str(phase))
                elif msg.kind == Kind.OUTPUT and agent in pending and phase_of(msg) == phase:
                    pending.discard(agent)
                    state.record(agent, msg.text)
                    record = CallRecord(agent, phase, call_stats_from_wire(msg.stats), msg.wall_s, msg.attempts)
                    calls.append(record)
                    yield AgentFinished(agent, phase, msg.text, record)
            state.advance()
        base = state.result()
        result = PipelineResult(
            outputs=base.outputs,
            history=base.history,
            rounds=base.rounds,
            run_id=run_id,
            calls=calls,
            wall_s=time.perf_counter() - started,
        )
        end_workflow(span, [r.stats for r in calls], base.rounds)
        span.end()  # the run is over; the caller may hold the stream open a while longer
        finished = True
        yield RunFinished(result)
    except GeneratorExit:  # the caller stopped reading early: a cancel, not a failure
        if not finished:
            span.set_attribute("kvmesh.cancelled", True)
        raise
    except BaseException as exc:
        if not finished:
            record_error(span, exc)
        raise
    finally:
        sink.close(run_id)
        if not finished:
            _cancel(spec, channels, run_id)
            span.end()


def _start(spec: RunSpec, state: RunState, run_id: str, name: str) -> agent_pb2.Message:
    phase: Phase = state.phase  # type: ignore[assignment]
    return message(
        Kind.START,
        run_id,
        phase,
        DRIVER,
        target=name,
        inputs=state.external_inputs(name),
        wait_for=spec.pipeline.upstream(name, phase),
        deliver_to=spec.pipeline.downstream(name, phase),
        stream=spec.stream,
        driver=spec.driver,
    )


def _send(spec: RunSpec, channels: Channels, name: str, msg: agent_pb2.Message) -> None:
    try:
        stub = agent_pb2_grpc.AgentServiceStub(channels.get(spec.agents[name]))
        stub.Deliver(msg, metadata=from_driver(spec.driver_key))
    except grpc.RpcError as exc:
        raise AgentError(name, describe_rpc_error(exc, "delivering START")) from exc
    except RuntimeFailure as exc:  # e.g. a START over the message size limit
        raise AgentError(name, str(exc)) from exc


def _next(
    spec: RunSpec,
    channels: Channels,
    inbox: queue.Queue[agent_pb2.Message],
    pending: set[str],
    deadline: float | None,
) -> agent_pb2.Message:
    while True:
        wait = LIVENESS_POLL_S if deadline is None else min(LIVENESS_POLL_S, deadline - time.perf_counter())
        if wait <= 0:
            raise RunTimedOut(f"the run exceeded its timeout of {spec.timeout_s} s, waiting for {sorted(pending)}")
        try:
            return inbox.get(timeout=wait)
        except queue.Empty:
            _check_alive(spec, channels, pending)


def _check_alive(spec: RunSpec, channels: Channels, pending: set[str]) -> None:
    for name in sorted(pending):
        stub = agent_pb2_grpc.AgentServiceStub(channels.get(spec.agents[name]))
        try:
            stub.Status(agent_pb2.StatusRequest())
        except grpc.RpcError as exc:
            raise AgentDiedError(name, "its actor stopped answering: " + describe_rpc_error(exc, "Status")) from exc


def _cancel(spec: RunSpec, channels: Channels, run_id: str) -> None:
    """Best effort, short deadline: tell every agent of the pipeline to drop the run."""
    cancel = agent_pb2.Message(kind=Kind.CANCEL, run_id=run_id, source=DRIVER)
    for address in spec.agents.values():
        with contextlib.suppress(grpc.RpcError):  # an agent that is gone has nothing to cancel
            stub = agent_pb2_grpc.AgentServiceStub(channels.get(address))
            stub.Deliver(cancel, timeout=2.0, metadata=from_driver(spec.driver_key))
