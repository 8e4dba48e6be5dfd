"""What a run raises: each error names the agent, worker or setting at fault and the cause."""

from __future__ import annotations


class RuntimeFailure(RuntimeError):
    """Base of the runtime's errors."""


class AgentError(RuntimeFailure):
    """An agent's call failed (its tool, its prompt, its worker); `agent` and `cause` say which and why."""

    def __init__(self, agent: str, cause: str, phase: str | None = None) -> None:
        where = f"agent {agent!r}" + (f" ({phase})" if phase else "")
        super().__init__(f"{where} failed: {cause}")
        self.agent = agent
        self.cause = cause
        self.phase = phase


class AgentDiedError(AgentError):
    """An agent's actor stopped answering (it crashed or was killed); the session starts fresh ones next run."""


class WorkerDiedError(RuntimeFailure):
    """A worker actor died and could not be restarted (or died again)."""

    def __init__(self, worker: str, detail: str) -> None:
        super().__init__(f"worker {worker!r} died and was not restarted: {detail}")
        self.worker = worker


class MessageTooLargeError(RuntimeFailure):
    """A gRPC message over the configured limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what}: the message is {size:,} bytes, over the limit of {limit:,} bytes; raise "
            "RuntimeConfig.max_message_bytes (env KVMESH_MAX_MESSAGE_MB) or send less (e.g. shorten a tool's output)"
        )
        self.size = size
        self.limit = limit


class RunTimedOut(RuntimeFailure, TimeoutError):
    """The run took longer than its timeout_s; the message names the agents it was waiting for."""


class CallFailed(RuntimeFailure):
    """An agent's LLM call or message delivery failed; the message says where and why."""
