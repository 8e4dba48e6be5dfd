"""The fidelity tasks through `kvmesh serve`: does a chat client get the answers the pipeline path gets?

The same items (bench/fidelity_items.py, the holdout split) and pipelines (bench/fidelity_pipelines.py) run two
ways on the same workers, in each mode:
- the pipeline path: `Session.run` of the pipeline, its agents as Ray actors;
- the server path: the same agents in this process (agents.run_locally), each call a streamed chat completion
  as an unchanged client would send it: the agent's system prompt (if any) and one user message holding the
  rendered template, earlier agents' replies quoted inside it. No hints: the server finds replies it wrote by
  their text, and the slot is the system prompt's.
Modes: `dense` (the `kvmesh` extension's `{"reuse": "dense"}` on the server) and `auto` (each side's default).
Per shape and pooled: accuracy of each, the paired difference server - pipeline with its 95% bootstrap interval,
the share of items whose scored reply is the same text, and the server's reused share of prompt tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvmesh.agents import Agent, Prompt, run_locally

from .fidelity_bench import select_items
from .fidelity_items import ItemConfig, contains_answer, generate_items
from .fidelity_pipelines import shape_pipeline
from .openai_client import StreamedCall, stream_chat
from .paired_stats import paired_bootstrap_ci

Json = dict[str, Any]
MODES = ("dense", "auto")
SPLIT = "holdout"  # nothing was tuned on it


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """What a chat client sends for an agent's prompt: its system message, then the rendered template."""
    system = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
    return [*system, {"role": "user", "content": prompt.user_text}]


def server_llm(base_url: str, model: str, mode: str, calls: list[StreamedCall]) -> Callable[[Agent, Prompt], str]:
    extra = {"kvmesh": {"reuse": mode}} if mode != "auto" else {}

    def llm(agent: Agent, prompt: Prompt) -> str:
        payload = {
            "model": model,
            "messages": chat_messages(prompt),
            "max_tokens": agent.max_tokens,
            "temperature": agent.temperature,
        } | extra
        call = stream_chat(base_url, payload)
        if call.error is not None:
            raise RuntimeError(f"the server failed {agent.name}'s call: {call.error}")
        calls.append(call)
        return call.text

    return llm


def bench_serve_fidelity(
    session: Any,
    base_url: str,
    model: str,
    shapes: Sequence[str],
    items_per_shape: int,
    log: Callable[[str], None],
    seed: int = 0,
) -> Json:
    item_set = generate_items(ItemConfig(seed=seed))
    report: Json = {"split": SPLIT, "items_per_shape": items_per_shape, "modes": list(MODES), "shapes": {}}
    pooled: dict[str, dict[str, list[bool]]] = {m: {"pipeline": [], "server": []} for m in MODES}
    for shape in shapes:
        spec = shape_pipeline(shape, item_set)
        items = select_items(item_set.items[shape], SPLIT, items_per_shape)
        outcome: dict[str, dict[str, list[bool]]] = {m: {"pipeline": [], "server": []} for m in MODES}
        same_text = {m: 0 for m in MODES}
        reused = {m: [0, 0] for m in MODES}  # server: reused prompt tokens, prompt tokens
        pipelines = {mode: spec.pipeline.with_agent_options(reuse=mode) for mode in MODES}
        for number, item in enumerate(items, 1):
            for mode in MODES:
                through_pipeline = session.run(pipelines[mode], item.question).outputs[spec.scored_agent]
                calls: list[StreamedCall] = []
                through_server = run_locally(
                    spec.pipeline, item.question, server_llm(base_url, model, mode, calls)
                ).outputs[spec.scored_agent]
                outcome[mode]["pipeline"].append(contains_answer(through_pipeline, item.answer))
                outcome[mode]["server"].append(contains_answer(through_server, item.answer))
                same_text[mode] += through_pipeline.strip() == through_server.strip()
                reused[mode][0] += sum((c.kvmesh or {}).get("reused_tokens", 0) for c in calls)
                reused[mode][1] += sum(c.usage.get("prompt_tokens", 0) for c in calls)
            log(
                f"serve fidelity {shape} {number}/{len(items)}: "
                + ", ".join(
                    f"{m} pipeline {sum(outcome[m]['pipeline'])} server {sum(outcome[m]['server'])}" for m in MODES
                )
            )
        for pipeline in pipelines.values():
            session.release(pipeline)
        for mode in MODES:
            for path in ("pipeline", "server"):
                pooled[mode][path] += outcome[mode][path]
        report["shapes"][shape] = {
            mode: _compare(outcome[mode])
            | {
                "same_text": same_text[mode] / len(items),
                "server_reused_share": reused[mode][0] / reused[mode][1] if reused[mode][1] else None,
            }
            for mode in MODES
        }
    report["pooled"] = {mode: _compare(pooled[mode]) for mode in MODES}
    return report


def _compare(outcome: dict[str, list[bool]]) -> Json:
    pipeline, server = outcome["pipeline"], outcome["server"]
    low, high = paired_bootstrap_ci(server, pipeline)
    return {
        "items": len(pipeline),
        "pipeline_accuracy": sum(pipeline) / len(pipeline),
        "server_accuracy": sum(server) / len(server),
        "server_minus_pipeline": (sum(server) - sum(pipeline)) / len(pipeline),
        "ci95": [low, high],
    }


def print_serve_fidelity(report: Json) -> None:
    print(f"\nfidelity tasks through the server ({report['split']} split, {report['items_per_shape']} items a shape):")
    print(
        f"{'shape':<10} {'mode':<6} {'pipeline':>9} {'server':>7} {'server - pipeline [95% CI]':>28} "
        f"{'same text':>9} {'reused':>7}"
    )
    for shape, modes in report["shapes"].items():
        for mode, row in modes.items():
            reused = row["server_reused_share"]
            print(
                f"{shape:<10} {mode:<6} {row['pipeline_accuracy']:>9.0%} {row['server_accuracy']:>7.0%} "
                f"{_interval(row):>28} {row['same_text']:>9.0%} {'n/a' if reused is None else f'{reused:.0%}':>7}"
            )
    for mode, row in report["pooled"].items():
        print(
            f"{'pooled':<10} {mode:<6} {row['pipeline_accuracy']:>9.0%} {row['server_accuracy']:>7.0%} "
            f"{_interval(row):>28}"
        )


def _interval(row: Json) -> str:
    low, high = row["ci95"]
    return f"{100 * row['server_minus_pipeline']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
