"""Where a chain run's wall time goes, read off its trace (kvmesh's spans, collected with trace "memory").

A chain is sequential, so its critical path is: the run's start until the first LLM call starts at the
worker (`lead_in`), each call at the worker (its `chat` span), each hop from one call's end at the
worker to the next call's start there (`hops`: the stream's end at the agent, the OUTPUT to the next agent
and the driver, the next agent's rendering, routing and Generate set-up), and the last call's end until
the run ends (`tail`). Each chat span splits further into
  - model: what the worker reports as engine time (TTFT, planning included, + decode), as in CallStats;
  - worker_wait: the part of the time to the first chunk that the reported TTFT leaves out (queueing
    before planning starts, e.g. for the reuse planner's lock);
  - worker_other: the rest (chunks on their way, the stream's end at the worker).
All spans share one clock (one machine), so times from different processes subtract.
"""

from __future__ import annotations

import itertools
from typing import Any

from kvmesh.runtime.span_record import SpanRecord

Json = dict[str, Any]


def _model_s(chat: SpanRecord) -> float:
    a = chat.attributes
    tokens, rate = a.get("gen_ai.usage.output_tokens", 0), a.get("kvmesh.decode_tok_s", 0.0)
    return a.get("kvmesh.ttft_s", 0.0) + ((tokens - 1) / rate if rate else 0.0)


def breakdown(spans: list[SpanRecord], run_id: str) -> Json:
    """The critical-path split of one run (ms), from its spans; the chats in start order."""
    (root,) = [s for s in spans if s.attributes.get("kvmesh.run_id") == run_id]
    chats = sorted(
        (s for s in spans if s.trace_id == root.trace_id and s.name.startswith("chat ")), key=lambda s: s.start_ns
    )
    if not chats:
        raise ValueError(f"run {run_id}: no chat spans in its trace")
    ms = 1e-6
    model = [_model_s(c) * 1000 for c in chats]
    wait = [
        max(0.0, c.attributes.get("gen_ai.response.time_to_first_chunk", 0.0) - c.attributes.get("kvmesh.ttft_s", 0.0))
        * 1000
        for c in chats
    ]
    chat = [c.duration_s * 1000 for c in chats]
    hops = [(b.start_ns - a.end_ns) * ms for a, b in itertools.pairwise(chats)]
    return {
        "wall_ms": root.duration_s * 1000,
        "lead_in_ms": (chats[0].start_ns - root.start_ns) * ms,
        "tail_ms": (root.end_ns - chats[-1].end_ns) * ms,
        "hops_ms": hops,
        "hop_mean_ms": sum(hops) / len(hops) if hops else 0.0,
        "chat_ms": chat,
        "model_ms": model,
        "worker_wait_ms": wait,
        "worker_other_ms": [c - m - w for c, m, w in zip(chat, model, wait, strict=True)],
        "totals_ms": {
            "model": sum(model),
            "worker_wait": sum(wait),
            "worker_other": sum(chat) - sum(model) - sum(wait),
            "hops": sum(hops),
            "lead_in_and_tail": (chats[0].start_ns - root.start_ns + root.end_ns - chats[-1].end_ns) * ms,
        },
    }
