"""Prompt ids part by part (ARCHITECTURE.md, "Prompts as parts"): the model's chat frame around the parts, each
tokenized alone."""

from __future__ import annotations

import re

import pytest

from kvmesh.agents import Agent, Segment
from kvmesh.agents.render import render
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime.worker_request import worker_call
from kvmesh.v1 import worker_pb2
from kvmesh.workers.reuse_planner import PromptPart, ReusePlanner
from kvmesh.workers.sampling import InvalidRequestError

OFFERED = "auto, dense, prefix, kvcomm, blend"  # the modes users may choose: a refusal names them


@pytest.fixture(scope="module")
def planner(model, tokenizer) -> ReusePlanner:
    return ReusePlanner(model, tokenizer, store=None)  # tokenization and framing only


def parts(prompt) -> list[PromptPart]:
    return [
        PromptPart(p.text, segment_id(p.producer, p.text), p.placeholder)
        if isinstance(p, Segment)
        else PromptPart(p.text)
        for p in prompt.parts
    ]


def test_a_query_only_prompt_is_exactly_the_models_chat_prompt(planner, tokenizer):
    query = "What is the capital of France?"
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
        planned = planner.plan(system, [PromptPart(query, "query:1", "query")], "a", "prefix")
        assert planned.token_ids == tokenizer.encode(tokenizer.render_chat(messages))
        (span,) = planned.layout.segments()
        assert tokenizer.decode(planned.token_ids[span.start : span.end]) == query


def test_a_segment_has_the_same_tokens_wherever_it_lands(planner, tokenizer):
    shared = "Paris is the capital of France."
    values = {"query": "Why?", "writer": shared}
    prompts = [
        render(Agent("a", "Notes:{writer} then {query}"), {}, values),
        render(Agent("b", "{query}\n\nThe draft was:\n{writer}\nCheck it."), {}, values),
    ]
    spans = []
    for prompt in prompts:
        planned = planner.plan(None, parts(prompt), "x", "prefix")
        span = next(s for s in planned.layout.segments() if s.segment_id.startswith("writer:"))
        spans.append(planned.token_ids[span.start : span.end])
    assert spans[0] == spans[1] == tokenizer.encode(shared)


def test_empty_parts_add_no_tokens_and_the_frame_stays(planner, tokenizer):
    head, tail = planner.framer.frame(None)
    planned = planner.plan(None, [PromptPart("", "writer.prev:x", "writer.prev"), PromptPart("Go.")], "a", "prefix")
    assert planned.token_ids == head + tokenizer.encode("Go.") + tail
    assert planned.layout is None  # the only segment was empty: nothing to reuse


def test_an_unknown_reuse_mode_is_refused_naming_the_modes_users_may_choose(planner):
    with pytest.raises(InvalidRequestError, match=rf"reuse mode 'magic' is not one of {OFFERED}$"):
        planner.plan(None, [PromptPart("Hi")], "a", "magic")
    assert planner.plan(None, [PromptPart("Hi")], "a", "naive").stats.mode == "prefix"  # benchmarks' mode: taken


@pytest.mark.parametrize(("reuse", "seen"), [(worker_pb2.REUSE_MODE_KVCOMM_BLEND, "'kvcomm+blend'"), (99, "'99'")])
def test_a_requests_reuse_mode_the_worker_does_not_serve_is_refused_naming_the_valid_ones(planner, reuse, seen):
    """kvcomm+blend is only ever served; 99 is a mode some newer peer may know: neither is planned."""
    call = worker_call(worker_pb2.GenerateRequest(parts=[worker_pb2.PromptPart(text="Hi")], reuse=reuse))
    with pytest.raises(InvalidRequestError, match=rf"reuse mode {re.escape(seen)} is not one of {OFFERED}$"):
        planner.plan_conversation(call.system, call.turns, call.agent, call.reuse)
