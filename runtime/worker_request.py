"""What a worker takes from a GenerateRequest: the reuse planner's inputs and the sampling parameters.

One definition for the worker service and for the benchmarks that run a worker in process (no gRPC or Ray
here, only the message types), so a benchmark plans exactly the prompt a served call would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmesh.v1 import worker_pb2
from kvmesh.workers.reuse_planner import ChatTurn, PromptPart
from kvmesh.workers.sampling import SamplingParams

from .wire import reuse_mode_from_wire

DEFAULT_MAX_TOKENS = 256  # a request that leaves max_tokens unset (0 on the wire)
CHAT_ROLES = ("user", "assistant", "system")  # what a ChatMessage may be (the system prompt is the request's)


@dataclass(frozen=True)
class WorkerCall:
    agent: str
    system: str | None  # None: the model's default system prompt
    turns: tuple[ChatTurn, ...]  # the conversation after the system prompt; a pipeline's call: one user turn
    reuse: str  # the reuse mode's name; the planner refuses one it does not serve
    sampling: SamplingParams

    @property
    def parts(self) -> list[PromptPart]:
        """The user message of a pipeline's call (one user turn)."""
        if len(self.turns) != 1 or self.turns[0].role != "user":
            raise ValueError(f"this call is a conversation of {len(self.turns)} messages, not one user message")
        return list(self.turns[0].parts)


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
        turns = tuple(ChatTurn(message.role, _parts(message.parts)) for message in request.messages)
    else:
        turns = (ChatTurn("user", _parts(request.parts)),)
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


def _parts(parts: Iterable[worker_pb2.PromptPart]) -> tuple[PromptPart, ...]:
    return tuple(
        PromptPart(part.segment.text, part.segment.id or None, part.segment.placeholder or part.segment.producer)
        if part.WhichOneof("kind") == "segment"
        else PromptPart(part.text)
        for part in parts
    )
