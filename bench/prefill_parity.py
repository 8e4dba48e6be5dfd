"""prefill_parity: does a worker inside the runtime compute as fast as the same engine in-process?

A ~1.5K-token prompt, prefilled densely (reuse="dense": no prefix cache, no segments reused), through a
Session's worker actor and through an in-process worker built the same way (build_worker, the session's
WorkerConfig), alternating, several rounds. TTFT on both sides is what the worker reports: planning plus the
engine's arrival-to-first-token, so transport is not in it; what remains is how the actor computes (its
threads: Ray gives a 0.5-CPU actor OMP_NUM_THREADS=1 unless the session sets them). Target: the ratio <= 1.1.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from kvmesh.agents import Agent, Pipeline
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.workers.reuse_planner import PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.worker import build_worker

from .inprocess_worker import InProcessWorker

Json = dict[str, Any]
TARGET_PREFILL_PARITY = 1.1
HEAD, TAIL = "Read this survey report.\n\n", "\n\nIn one word: which island does the report praise most?"
_ISLANDS = ("Varnholm", "Quessary", "Lindqvist Rock", "Ostra Maren", "Tallowby", "Kestrel Key")
_SENTENCES = (
    "The survey boat reached {island} at dawn and anchored in the lee of its northern cliffs.",
    "Its harbour master, a patient man, kept a ledger of every vessel since the lighthouse was rebuilt.",
    "On {island} the wells run brackish in late summer, so the islanders collect rain in slate cisterns.",
    "Children there learn to read the tide tables before they can ride a bicycle.",
    "The team counted {n} nesting pairs of terns along the shingle and photographed each colony.",
    "A ferry calls twice a week, weather permitting, and brings flour, diesel and the post.",
    "Older residents remember the winter the strait froze and a horse walked across to the mainland.",
)


def parity_document(sentences: int = 66) -> str:
    """~1.5K tokens of plain prose about invented islands (~23 tokens a sentence)."""
    lines = []
    for i in range(sentences):
        template = _SENTENCES[i % len(_SENTENCES)]
        lines.append(template.format(island=_ISLANDS[(i // len(_SENTENCES)) % len(_ISLANDS)], n=40 + 7 * i))
    return " ".join(lines)


def bench_prefill_parity(session: Any, rounds: int, log: Any) -> Json:
    """Dense TTFT of one ~1.5K-token prompt through `session`'s worker and in-process, `rounds` each, alternating."""
    document = parity_document()
    pipeline = Pipeline("prefill-parity", [Agent("reader", HEAD + "{query}" + TAIL, max_tokens=1, reuse="dense")])
    parts = [PromptPart(HEAD), PromptPart(document, segment_id("query", document), "query"), PromptPart(TAIL)]
    local = InProcessWorker(build_worker(replace(session.config.worker, threads=None), store=None))
    session.run(pipeline, document)  # starts the agent actor; not measured
    runtime_s, inprocess_s, prompt_tokens = [], [], set()
    for index in range(rounds):
        (call,) = session.run(pipeline, document).calls
        runtime_s.append(call.stats.ttft_s)
        local_call = local.call("reader", None, parts, "dense", SamplingParams(max_tokens=1))
        inprocess_s.append(local_call.stats.ttft_s)
        prompt_tokens |= {call.stats.prompt_tokens, len(local_call.prompt_ids)}
        log(
            f"prefill parity round {index + 1}/{rounds}: session {call.stats.ttft_s:.3f} s, "
            f"in-process {local_call.stats.ttft_s:.3f} s"
        )
    session.release(pipeline)
    if len(prompt_tokens) != 1:
        raise AssertionError(f"the session's and the in-process prompt differ in length: {sorted(prompt_tokens)}")
    ratio = statistics.median(runtime_s) / statistics.median(inprocess_s)
    return {
        "prompt_tokens": prompt_tokens.pop(),
        "session_ttft_s": runtime_s,
        "inprocess_ttft_s": inprocess_s,
        "ratio": ratio,  # median session TTFT / median in-process TTFT
        "worker_threads": session.worker_threads,
        "target": TARGET_PREFILL_PARITY,
        "pass": ratio <= TARGET_PREFILL_PARITY,
    }
