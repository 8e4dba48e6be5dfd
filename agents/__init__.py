"""The user's API: agents, prompt templates, tools and pipelines. Pure Python, no Ray or gRPC here."""

from .agent import Agent
from .documents import Chunk, DocumentStore
from .errors import InvalidTextError, PipelineError
from .local import run_locally
from .parts import Prompt, Segment, TextPart
from .pipeline import Phase, Pipeline
from .placement import Placement
from .run_state import RunResult, RunState
from .tool import Tool, ToolError, tool
from .topologies import chain, debate, fan_out_in, fully_connected, self_refine

__all__ = [
    "Agent",
    "Chunk",
    "DocumentStore",
    "InvalidTextError",
    "Phase",
    "Pipeline",
    "PipelineError",
    "Placement",
    "Prompt",
    "RunResult",
    "RunState",
    "Segment",
    "TextPart",
    "Tool",
    "ToolError",
    "chain",
    "debate",
    "fan_out_in",
    "fully_connected",
    "run_locally",
    "self_refine",
    "tool",
]
