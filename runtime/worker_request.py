"""What a worker takes from a GenerateRequest: the reuse planner's inputs and the sampling parameters.

One definition for the worker service and for the benchmarks that run a worker in process (no gRPC or Ray
here, only the message types), so a benchmark plans exactly the prompt a served call would.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.v1 import worker_pb2
from kvmesh.workers.reuse_planner import PromptPiece
from kvmesh.workers.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256  # a request that leaves max_tokens unset (0 on the wire)


@dataclass(frozen=True)
class WorkerCall:
    agent: str
    system: str | None  # None: the model's default system prompt
    pieces: list[PromptPiece]
    reuse: str
    sampling: SamplingParams


def worker_call(request: worker_pb2.GenerateRequest) -> WorkerCall:
    """The request's prompt as planner pieces (a segment keeps its id; its anchor slot is named by its
    placeholder, else its producer), its system prompt, reuse mode (unset: auto) and sampling. Raises
    InvalidRequestError for sampling the engine cannot serve."""
    pieces = []
    for part in request.parts:
        if part.WhichOneof("kind") == "segment":
            segment = part.segment
            pieces.append(PromptPiece(segment.text, segment.id or None, segment.placeholder or segment.producer))
        else:
            pieces.append(PromptPiece(part.text))
    sampling = request.sampling
    return WorkerCall(
        agent=request.agent,
        system=request.system if request.HasField("system") else None,
        pieces=pieces,
        reuse=request.reuse or "auto",
        sampling=SamplingParams(
            max_tokens=int(sampling.max_tokens) or DEFAULT_MAX_TOKENS,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p) or 1.0,
            seed=int(sampling.seed) if sampling.HasField("seed") else None,
            stop=tuple(sampling.stop),
        ),
    )
