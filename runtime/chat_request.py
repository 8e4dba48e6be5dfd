"""An OpenAI chat request as a worker's GenerateRequest: each message's content a segment, found wherever it recurs.

No client change is needed for reuse. A message's content is a segment identified by its content (producer
"client"), so the same passage sent to three agents under three system prompts is prefilled once. A reply
this door produced comes back by its text alone — as an assistant message, forwarded whole, or quoted inside
another message — and the reply index (reply_index.py) gives it back the id its worker published it under,
segment_id(slot, text), so its KV from its own decode is found. The first system (or developer) message is the
chat frame's system prompt; the slot identity — the request's `agent`: whose anchors apply, and the producer
of its reply — is named by `prompt_cache_key`, else `user` / `safety_identifier`, else the system prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.v1 import worker_pb2

from .openai_schema import ChatCompletionRequest
from .reply_index import ReplyIndex
from .wire import reuse_mode_to_wire

CLIENT = "client"  # the producer of content this server did not write
WORKFLOW = "openai"  # GenerateRequest.workflow of the door's calls (traces)


@dataclass(frozen=True)
class DoorCall:
    slot: str
    request: worker_pb2.GenerateRequest
    segment_ids: list[str]  # in prompt order, for routing


def slot_of(body: ChatCompletionRequest, system: str | None) -> str:
    """A short name for the slot: the same key (or system prompt) gives the same name in every replica."""
    if body.prompt_cache_key:
        basis = f"key\x00{body.prompt_cache_key}"
    elif body.user or body.safety_identifier:
        basis = f"user\x00{body.user or body.safety_identifier}"
    else:
        basis = "system\x00" + (system if system is not None else "\x00the model's default")
    return "chat-" + hashlib.sha256(basis.encode()).hexdigest()[:12]


def door_call(body: ChatCompletionRequest, replies: ReplyIndex, request_id: str) -> DoorCall:
    messages = list(body.messages)
    system = None
    if messages[0].role in ("system", "developer"):
        system = messages[0].text("messages[0]")
    slot = slot_of(body, system)
    chat: list[worker_pb2.ChatMessage] = []
    ids: list[str] = []
    first = 1 if system is not None else 0
    for index, message in enumerate(messages[first:], first):
        role = "system" if message.role == "developer" else message.role
        parts = []
        pieces = replies.split(message.text(f"messages[{index}]"))
        for number, piece in enumerate(pieces):
            if not piece.text:
                continue
            producer = piece.producer or CLIENT
            key = segment_id(producer, piece.text)
            placeholder = f"m{index}" if len(pieces) == 1 else f"m{index}.{number}"  # its anchor slot
            segment = worker_pb2.Segment(id=key, producer=producer, placeholder=placeholder, text=piece.text)
            parts.append(worker_pb2.PromptPart(segment=segment))
            ids.append(key)
        chat.append(worker_pb2.ChatMessage(role=role, parts=parts))
    sampling = worker_pb2.Sampling(
        max_tokens=body.max_output_tokens or 0,  # 0: the worker's default
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's defaults
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_strings,
    )
    if body.seed is not None:
        sampling.seed = body.seed
    request = worker_pb2.GenerateRequest(
        request_id=request_id,
        agent=slot,
        messages=chat,
        sampling=sampling,
        reuse=reuse_mode_to_wire((body.kvmesh.reuse if body.kvmesh else None) or "auto"),
        workflow=WORKFLOW,
    )
    if system is not None:
        request.system = system
    return DoorCall(slot, request, ids)
