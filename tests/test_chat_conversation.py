"""A whole conversation planned in the model's chat frame: each message's content tokenized alone, as a segment."""

from __future__ import annotations

import pytest

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime.worker_request import worker_call
from kvmesh.v1 import worker_pb2
from kvmesh.workers.reuse_planner import ChatTurn, PromptPart, ReusePlanner

CONVERSATION = [
    ("user", "What is the capital of Peru?"),
    ("assistant", "Lima is the capital of Peru."),
    ("user", "And its population?"),
]


@pytest.fixture(scope="module")
def planner(model, tokenizer) -> ReusePlanner:
    return ReusePlanner(model, tokenizer, store=None)  # tokenization and framing only


def turns(conversation: list[tuple[str, str]]) -> list[ChatTurn]:
    return [
        ChatTurn(role, [PromptPart(text, segment_id("client", text), f"m{i}")])
        for i, (role, text) in enumerate(conversation)
    ]


def test_a_conversation_is_exactly_the_models_chat_prompt_with_a_span_per_message(planner, tokenizer):
    for system in (None, "You are terse."):
        messages = [{"role": role, "content": text} for role, text in CONVERSATION]
        messages = ([{"role": "system", "content": system}] if system else []) + messages
        planned = planner.plan_conversation(system, turns(CONVERSATION), "a", "prefix")
        assert planned.token_ids == tokenizer.encode(tokenizer.render_chat(messages))
        spans = planned.layout.segments()
        assert [tokenizer.decode(planned.token_ids[s.start : s.end]) for s in spans] == [t for _, t in CONVERSATION]
        assert [s.slot.rsplit("|", 1)[1] for s in spans] == ["m0", "m1", "m2"]


def test_one_user_message_is_the_special_case_plan_has_always_served(planner):
    parts = [PromptPart("Summarize: "), PromptPart("Tea is a drink.", "query:1", "query")]
    single = planner.plan("Be brief.", parts, "a", "prefix")
    conversation = planner.plan_conversation("Be brief.", [ChatTurn("user", parts)], "a", "prefix")
    assert single.token_ids == conversation.token_ids and single.layout == conversation.layout
    assert planner.framer.frames("Be brief.", ["user"]) == list(planner.framer.frame("Be brief."))


def test_the_frame_text_between_messages_is_template_text_and_keys_the_template(planner):
    a = planner.plan_conversation(None, turns(CONVERSATION), "a", "prefix").layout
    b = planner.plan_conversation(None, turns(CONVERSATION[:1]), "a", "prefix").layout
    assert [s.is_segment for s in a.spans] == [False, True, False, True, False, True, False]
    slot_a, slot_b = a.segments()[0].slot, b.segments()[0].slot
    assert slot_a != slot_b  # another shape of conversation is another template: other anchors, another guard


def test_a_generate_request_carries_parts_or_messages_not_both():
    part = worker_pb2.PromptPart(text="Hi")
    conversation = worker_pb2.GenerateRequest(
        messages=[worker_pb2.ChatMessage(role="user", parts=[part]), worker_pb2.ChatMessage(role="assistant")]
    )
    call = worker_call(conversation)
    assert [t.role for t in call.turns] == ["user", "assistant"]
    with pytest.raises(ValueError, match="conversation of 2 messages"):
        _ = call.parts
    assert worker_call(worker_pb2.GenerateRequest(parts=[part])).parts == [PromptPart("Hi")]
    with pytest.raises(ValueError, match="not both"):
        worker_call(worker_pb2.GenerateRequest(parts=[part], messages=[worker_pb2.ChatMessage(role="user")]))
    with pytest.raises(ValueError, match=r"messages\[0\].role is 'tool'"):
        worker_call(worker_pb2.GenerateRequest(messages=[worker_pb2.ChatMessage(role="tool")]))
