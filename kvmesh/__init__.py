"""kvmesh: multi-agent LLM pipelines on Ray, with KV caches shared across agents.

    import kvmesh
    pipeline = kvmesh.Pipeline("qa", [kvmesh.Agent("answerer", "{query}", max_tokens=64)])
    result = pipeline.run("What is the capital of France?")   # Ray, a worker, the agents: started here
    print(result.outputs["answerer"], result.stats["answerer"].ttft_s)

Importing kvmesh is cheap: Ray, gRPC and the engine load when the first run starts.
"""

from kvmesh.agents import (
    Agent,
    DocumentStore,
    Phase,
    Pipeline,
    PipelineError,
    Placement,
    RunResult,
    Tool,
    ToolError,
    chain,
    debate,
    fan_out_in,
    fully_connected,
    run_locally,
    self_refine,
    tool,
)
from kvmesh.agents.executor import set_executor

__version__ = "0.1.0"


def _runtime_executor():  # type: ignore[no-untyped-def]
    from kvmesh.runtime.executor import RuntimeExecutor

    return RuntimeExecutor()


set_executor(_runtime_executor)

__all__ = [
    "Agent",
    "DocumentStore",
    "Phase",
    "Pipeline",
    "PipelineError",
    "Placement",
    "RunResult",
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
