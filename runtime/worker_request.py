"""What a worker takes from a GenerateRequest: the reuse planner's inputs and the sampling parameters.

One definition for the worker service and for the benchmarks that run a worker in process (no gRPC or Ray
here, only the message types), so a benchmark plans exactly the prompt a served call would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmesh.v1 import worker_pb2
from kvmesh.workers.reuse_planner import ChatTurn, PromptPiece
from kvmesh.workers.sampling import SamplingParams

from .wire import reuse_mode_from_wire

DEFAULT_MAX_TOKENS = 256  # a request that leaves max_tokens unset (0 on the wire)
CHAT_ROLES = ("user", "assistant", "system")  # what a ChatMessage may be (the system prompt is the request's)


@dataclass(frozen=True)
class WorkerCall:
    agent: str
    system: str | None  # None: the model's default system prompt
    turns: tuple[ChatTurn, ...]  # the conversation after the system prompt; a pipeline's call: one user turn
    reuse: str
    sampling: SamplingParams

    @property
    def pieces(self) -> list[PromptPiece]:
        """The user message of a pipeline's call (one user turn)."""
        if len(self.turns) != 1 or self.turns[0].role != "user":
            raise ValueError(f"this call is a conversation of {len(self.turns)} messages, not one user message")
        return list(self.turns[0].pieces)


def worker_call(request: worker_pb2.GenerateRequest) -> WorkerCall:
    """The request's prompt as planner turns (a segment keeps its id; its anchor slot is named by its
    placeholder, else its producer), its system prompt, reuse mode (unset: auto) and sampling. Raises
    InvalidRequestError for sampling the engine cannot serve, ValueError for a malformed conversation."""
    if request.messages and request.parts:
        raise ValueError("a GenerateRequest carries either parts (one user message) or messages, not both")
    if request.messages:
        for index, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise ValueError(f"messages[{index}].role is {message.role!r}; use one of {', '.join(CHAT_ROLES)}")
        turns = tuple(ChatTurn(message.role, _pieces(message.parts)) for message in request.messages)
    else:
        turns = (ChatTurn("user", _pieces(request.parts)),)
    sampling = request.sampling
    return WorkerCall(
        agent=request.agent,
        system=request.system if request.HasField("system") else None,
        turns=turns,
        reuse=reuse_mode_from_wire(request.reuse),
        sampling=SamplingParams(
            max_tokens=int(sampling.max_tokens) or DEFAULT_MAX_TOKENS,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p) or 1.0,
            seed=int(sampling.seed) if sampling.HasField("seed") else None,
            stop=tuple(sampling.stop),
        ),
    )


def _pieces(parts: Iterable[worker_pb2.PromptPart]) -> tuple[PromptPiece, ...]:
    pieces = []
    for part in parts:
        if part.WhichOneof("kind") == "segment":
            segment = part.segment
            pieces.append(PromptPiece(segment.text, segment.id or None, segment.placeholder or segment.producer))
        else:
            pieces.append(PromptPiece(part.text))
    return tuple(pieces)
