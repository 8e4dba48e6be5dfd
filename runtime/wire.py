"""Conversions between the user's plain types (agents/) and the wire format (kvmesh.v1 protos)."""

from __future__ import annotations

from collections.abc import Mapping

from kvmesh.agents import Agent, Phase, Prompt, SegmentPart
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.v1 import agent_pb2, worker_pb2

Kind = agent_pb2.Message.Kind
DRIVER = "driver"  # Message.source of what the driver sends


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
        if isinstance(part, SegmentPart):
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
        request_id=request_id, agent=agent.name, parts=parts, sampling=sampling, reuse=agent.reuse, workflow=workflow
    )
    if prompt.system is not None:
        request.system = prompt.system
    return request


def segment_ids(prompt: Prompt) -> list[str]:
    return [segment_id(part.producer, part.text) for part in prompt.parts if isinstance(part, SegmentPart)]
