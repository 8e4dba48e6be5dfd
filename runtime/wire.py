"""Conversions between kvmesh's plain types (agents/; workers' vocabulary and CallStats) and the wire (kvmesh.v1)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from kvmesh.agents import Agent, Phase, Prompt, Segment
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.v1 import agent_pb2, worker_pb2
from kvmesh.workers.vocabulary import FINISH_REASONS, SERVED_MODES, WORKER_MODES
from kvmesh.workers.worker import CallStats

Kind = agent_pb2.Message.Kind
DRIVER = "driver"  # Message.source of what the driver sends


def _numbered(enum: EnumTypeWrapper, prefix: str, names: Iterable[str], zero: str) -> dict[str, int]:
    """workers/vocabulary.py's names -> a worker.proto enum's numbers: the name in upper case after the enum's
    prefix ("kvcomm+blend": REUSE_MODE_KVCOMM_BLEND), and `zero` the unset value's name."""
    return {zero: 0} | {name: enum.Value(prefix + name.upper().replace("+", "_")) for name in names if name != zero}


_REUSE_MODES = _numbered(worker_pb2.ReuseMode, "REUSE_MODE_", (*WORKER_MODES, *SERVED_MODES), "auto")
_REUSE_NAMES = {number: name for name, number in _REUSE_MODES.items()}
_FINISH_REASONS = _numbered(worker_pb2.FinishReason, "FINISH_REASON_", FINISH_REASONS, "")  # "": not finished
_FINISH_NAMES = {number: name for name, number in _FINISH_REASONS.items()}


def reuse_mode_to_wire(mode: str) -> int:
    return _REUSE_MODES[mode]


def reuse_mode_from_wire(number: int) -> str:
    """A ReuseMode's name; one this build does not know (a newer peer's) is its number, which the planner
    refuses naming the modes it knows."""
    return _REUSE_NAMES.get(number, str(number))


def finish_reason_to_wire(reason: str) -> int:
    return _FINISH_REASONS[reason]


def finish_reason_from_wire(number: int) -> str:
    """A FinishReason's name ("" for the unset value: not finished; its number for one this build does not know)."""
    return _FINISH_NAMES.get(number, str(number))


def call_stats_to_wire(stats: CallStats) -> worker_pb2.CallStats:
    """The worker's CallStats as sent (the worker service's final chunk): the same fields, modes as ReuseMode."""
    modes = {key: reuse_mode_to_wire(mode) for key, mode in stats.segment_modes.items()}
    return worker_pb2.CallStats(
        **asdict(stats) | {"reuse_mode": reuse_mode_to_wire(stats.reuse_mode), "segment_modes": modes}
    )


def call_stats_from_wire(message: worker_pb2.CallStats) -> CallStats:
    """A worker's CallStats as received: the one place the runtime reads the message's fields."""
    plain = {field.name: getattr(message, field.name) for field in fields(CallStats)}
    return CallStats(
        **plain
        | {
            "reuse_mode": reuse_mode_from_wire(message.reuse_mode),
            "segment_modes": {key: reuse_mode_from_wire(mode) for key, mode in message.segment_modes.items()},
            "segment_reasons": dict(message.segment_reasons),
            "degradations": tuple(message.degradations),
        }
    )


def phase_of(message: agent_pb2.Message) -> Phase:
    return Phase(int(message.phase), final=bool(message.final_phase))


def message(kind: int, run_id: str, phase: Phase, source: str, target: str = "", **fields: object) -> agent_pb2.Message:
    return agent_pb2.Message(
        kind=kind,
        run_id=run_id,
        phase=phase.index,
        final_phase=phase.final,
        source=source,
        target=target,
        **fields,
    )


def generate_request(
    agent: Agent, prompt: Prompt, request_id: str, workflow: str, holders: Mapping[str, str]
) -> worker_pb2.GenerateRequest:
    """holders: segment id -> address of the worker that produced it (a hint for KV reuse)."""
    parts = []
    for part in prompt.parts:
        if isinstance(part, Segment):
            key = segment_id(part.producer, part.text)
            segment = worker_pb2.Segment(
                id=key,
                producer=part.producer,
                placeholder=part.placeholder,
                text=part.text,
                holder=holders.get(key, ""),
            )
            parts.append(worker_pb2.PromptPart(segment=segment))
        else:
            parts.append(worker_pb2.PromptPart(text=part.text))
    sampling = worker_pb2.Sampling(
        max_tokens=agent.max_tokens, temperature=agent.temperature, top_p=agent.top_p, stop=list(agent.stop)
    )
    if agent.seed is not None:
        sampling.seed = agent.seed
    request = worker_pb2.GenerateRequest(
        request_id=request_id,
        agent=agent.name,
        parts=parts,
        sampling=sampling,
        reuse=reuse_mode_to_wire(agent.reuse),
        workflow=workflow,
    )
    if prompt.system is not None:
        request.system = prompt.system
    return request


def segment_ids(prompt: Prompt) -> list[str]:
    return [segment_id(part.producer, part.text) for part in prompt.parts if isinstance(part, Segment)]
