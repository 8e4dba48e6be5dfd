"""Everything distributed: Ray bootstrap, agent and worker actors, gRPC services, registry, CLI.

`Session`, `RuntimeConfig` and the result and event types are exported lazily, so that importing
kvmesh (or running `kvmesh generate`) does not load Ray or gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Session": ".driver",
    "RuntimeConfig": ".config",
    "ConfigError": ".config",
    "PipelineResult": ".results",
    "CallRecord": ".results",
    "CallStats": ".results",
    "AgentStats": ".results",
    "AgentError": ".errors",
    "WorkerDiedError": ".errors",
    "MessageTooLargeError": ".errors",
    "RunTimedOut": ".errors",
    "PhaseStarted": ".events",
    "Token": ".events",
    "Retried": ".events",
    "AgentFinished": ".events",
    "RunFinished": ".events",
    "connect": ".cluster",
    "shutdown": ".cluster",
    "default_session": ".executor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmesh.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
