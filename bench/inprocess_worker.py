"""The worker side of kvmesh in one process (engine + reuse planner + chat framing), for benchmarks that
must measure the serving path itself without Ray and gRPC around it."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.workers.engine import RequestFailed
from kvmesh.workers.reuse_planner import PromptPart, ReuseStats
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.worker import CallStats, Worker


@dataclass
class CallResult:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: CallStats  # as a served call reports it (TTFT: planning included)
    reuse: ReuseStats  # the planner's decision, with what benchmarks study (matches, blend_recomputed)
    prompt_kv: KVCache | None  # the prompt's KV as the engine had it when the prompt was done (if captured)


class InProcessWorker:
    """A worker (workers/worker.py: build_worker) driven call by call from the caller's thread."""

    def __init__(self, worker: Worker) -> None:
        self.engine = worker.engine
        self.planner = worker.planner

    def call(
        self,
        agent: str,
        system: str | None,
        parts: list[PromptPart],
        mode: str,
        sampling: SamplingParams,
        capture: bool = False,
    ) -> CallResult:
        planned = self.planner.plan(system, parts, agent, mode)
        captured: list[KVCache] = []
        if capture:
            inner = planned.reuse.on_prefilled

            def on_prefilled(cache: KVCache) -> None:
                captured.append(cache.slice(0))
                if inner is not None:
                    inner(cache)

            planned.reuse.on_prefilled = on_prefilled
        request = self.engine.add_request(planned.token_ids, sampling, role=agent, reuse=planned.reuse)
        tokens: list[int] = []
        texts: list[str] = []
        while True:
            for event in self.engine.step():
                if event.request_id != request:
                    continue
                if event.token_id is not None:
                    tokens.append(event.token_id)
                texts.append(event.text)
                if event.finished:
                    self.planner.drain()  # anchors and segments are in the store before the next call
                    if event.error is not None:
                        raise RequestFailed(f"{agent}'s call failed in the engine: {event.error}")
                    assert event.stats is not None  # an end event carries them
                    return CallResult(
                        text="".join(texts),
                        token_ids=tokens,
                        prompt_ids=planned.token_ids,
                        stats=CallStats.of(event.stats, planned.stats),
                        reuse=planned.stats,
                        prompt_kv=captured[0] if captured else None,
                    )
