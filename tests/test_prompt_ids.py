"""Prompt ids part by part (DESIGN §3): the model's chat frame around the parts, each tokenized alone."""

from __future__ import annotations

from kvmesh.agents import Agent
from kvmesh.agents.render import render
from kvmesh.runtime.prompt_ids import ChatFramer, PromptPiece


def pieces(prompt) -> list[PromptPiece]:
    return [PromptPiece(p.text, getattr(p, "segment_id", None)) for p in prompt.parts]


def test_a_query_only_prompt_is_exactly_the_models_chat_prompt(tokenizer):
    framer = ChatFramer(tokenizer)
    query = "What is the capital of France?"
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
        expected = tokenizer.encode(tokenizer.render_chat(messages))
        built = framer.build(system, [PromptPiece(query, "query:1")])
        assert built.ids == expected
        (span,) = built.segments
        assert tokenizer.decode(built.ids[span.start : span.end]) == query


def test_a_segment_has_the_same_tokens_wherever_it_lands(tokenizer):
    framer = ChatFramer(tokenizer)
    shared = "Paris is the capital of France."
    values = {"query": "Why?", "writer": shared}
    prompts = [
        render(Agent("a", "Notes:{writer} then {query}"), {}, values),
        render(Agent("b", "{query}\n\nThe draft was:\n{writer}\nCheck it."), {}, values),
    ]
    spans = []
    for prompt in prompts:
        built = framer.build(None, pieces(prompt))
        span = next(s for s in built.segments if s.segment_id.startswith("writer:"))
        spans.append(built.ids[span.start : span.end])
    assert spans[0] == spans[1] == tokenizer.encode(shared)


def test_empty_parts_add_no_tokens_and_the_frame_stays(tokenizer):
    framer = ChatFramer(tokenizer)
    head, tail = framer.frame(None)
    built = framer.build(None, [PromptPiece("", "writer.prev:x"), PromptPiece("Go.")])
    assert built.ids == head + tokenizer.encode("Go.") + tail
    assert built.segments[0].start == built.segments[0].end == len(head)
