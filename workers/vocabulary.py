"""The words a call is asked and answered in: reuse modes and finish reasons, one definition for the engine,
the reuse planner, an Agent and the runtime.

On the wire they are worker.proto's ReuseMode and FinishReason (runtime/wire.py converts); tests/test_protos.py
fails when the two drift apart. Torch-free, so that kvmesh.agents (cheap to import, no engine) refuses when a
pipeline is built the mode a worker would refuse.
"""

from __future__ import annotations

from typing import Literal, get_args

# What a user may ask for (Agent.reuse, the OpenAI door's kvmesh.reuse); auto is the default.
ReuseMode = Literal["auto", "dense", "prefix", "kvcomm", "blend"]
REUSE_MODES: tuple[str, ...] = get_args(ReuseMode)
# Accepted by the worker but never offered to users: every segment's base KV moved into place uncorrected, the
# baseline benchmarks measure the other modes against.
BENCHMARK_MODES: tuple[str, ...] = ("naive",)
WORKER_MODES: tuple[str, ...] = REUSE_MODES + BENCHMARK_MODES  # what the reuse planner accepts
# What served a call (CallStats.reuse_mode) or a segment (segment_modes). kvcomm+blend is never asked for: it is
# kvcomm's KV repaired by a blend pass, a worker setting (WorkerConfig.kvcomm_repair).
SERVED_MODES: tuple[str, ...] = ("dense", "prefix", "kvcomm", "blend", "naive", "kvcomm+blend")

# How a call ends, on the wire too.
FinishReason = Literal["stop", "length", "cancelled"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
# The engine's too: "error" ends a request it failed alone. Never on the wire: the worker fails the call instead.
EngineFinish = Literal[FinishReason, "error"]
