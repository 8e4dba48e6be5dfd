"""The OpenAI door's request side, without a server: the schema's refusals, the reply index, segment ids."""

from __future__ import annotations

import json
import time

import pytest

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime.chat_request import CLIENT, door_call, slot_of
from kvmesh.runtime.config import ConfigError
from kvmesh.runtime.openai_errors import OpenAIError
from kvmesh.runtime.openai_schema import parse_request
from kvmesh.runtime.reply_index import Piece, ReplyIndex, ReplyIndexConfig
from kvmesh.v1 import worker_pb2

PASSAGE = "The river Arlen floods its valley every spring, and the people of Dunmere rebuild the mills."
REPLY = "The Arlen floods each spring; Dunmere rebuilds its mills every summer."


def body(**fields: object) -> bytes:
    return json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]} | fields).encode()


def refused(raw: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_request(raw)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "status", "param", "says"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "must be a JSON object"),
        (body(n=2), 400, "n", "n: 2 is not supported"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
        (body(logprobs=True), 400, "logprobs", "not supported"),
        (body(frequency_penalty=0.5), 400, "frequency_penalty", "not supported"),
        (body(response_format={"type": "json_object"}), 400, "response_format", "not supported"),
        (body(best_of=3), 400, "best_of", "Unrecognized request argument"),
        (body(temperature=3), 400, "temperature", "less than or equal to 2"),
        (body(top_p=0), 400, "top_p", "greater than 0"),
        (body(seed=-1), 400, "seed", "greater than or equal to 0"),
        (body(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
        (body(max_tokens=5, max_completion_tokens=6), 400, "max_tokens", "disagree"),
        (body(stop=["", "x"]), 400, "stop", "non-empty"),
        (body(kvmesh={"reuse": "magic"}), 400, "kvmesh.reuse", "auto"),
        (body(messages=[]), 400, "messages", "at least 1"),
        (
            body(messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]),
            400,
            "messages[0].role",
            "tool calls are not supported",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            None,
            None,
            None,
        ),  # refused when its text is read (door_call), below
        (body(messages=[{"role": "user", "content": "Hi", "name": "ann"}]), 400, "messages[0].name", "not supported"),
    ],
)
def test_what_the_server_cannot_honour_is_a_400_naming_it(raw, status, param, says):
    if status is None:
        request = parse_request(raw)
        with pytest.raises(OpenAIError, match=r"content\[0\]: content parts of type 'image_url'"):
            door_call(request, ReplyIndex(), "r")
        return
    error = refused(raw)
    assert error.status == status and error.param == param, error.body()
    assert says in error.message, error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_neutral_values_of_unimplemented_fields_are_accepted():
    request = parse_request(
        body(
            n=1,
            logprobs=False,
            tools=[],
            presence_penalty=0,
            store=False,
            stream_options={"include_usage": True},
            parallel_tool_calls=True,
        )
    )
    assert request.stream_options.include_usage and request.max_output_tokens is None


def test_a_conversation_becomes_framed_messages_whose_contents_are_segments_by_content():
    request = parse_request(
        body(
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": PASSAGE},
                {"role": "assistant", "content": None},
                {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
            ],
            max_completion_tokens=7,
            temperature=0,
            seed=3,
            stop="END",
            kvmesh={"reuse": "dense"},
        )
    )
    call = door_call(request, ReplyIndex(), "req-1")
    wire = call.request
    assert wire.system == "You are terse." and wire.agent == call.slot and wire.reuse == worker_pb2.REUSE_MODE_DENSE
    assert [m.role for m in wire.messages] == ["user", "assistant", "system"]  # developer is system
    assert not wire.messages[1].parts  # no content: only the frame
    passage, note = wire.messages[0].parts[0].segment, wire.messages[2].parts[0].segment
    assert passage.id == segment_id(CLIENT, PASSAGE) and passage.placeholder == "m1"
    assert note.text == "Be\nbrief." and note.placeholder == "m3"
    assert call.segment_ids == [passage.id, note.id]
    sampling = wire.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.seed, list(sampling.stop)) == (7, 0.0, 3, ["END"])
    # the same passage under another system prompt: the same segment, in another slot
    other = door_call(
        parse_request(
            body(messages=[{"role": "system", "content": "You are a poet."}, {"role": "user", "content": PASSAGE}])
        ),
        ReplyIndex(),
        "r",
    )
    assert other.segment_ids == [passage.id] and other.slot != call.slot


def test_openai_defaults_apply_when_sampling_is_left_out():
    sampling = door_call(parse_request(body()), ReplyIndex(), "r").request.sampling
    assert sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.max_tokens == 0  # worker's default
    assert not sampling.HasField("seed")


def test_the_slot_is_named_by_prompt_cache_key_then_user_then_the_system_prompt():
    plain = parse_request(body())
    assert slot_of(plain, "A") == slot_of(plain, "A") != slot_of(plain, "B") != slot_of(plain, None)
    keyed = parse_request(body(prompt_cache_key="planner", user="ann"))
    assert slot_of(keyed, "A") == slot_of(keyed, "B") != slot_of(parse_request(body(user="ann")), "A")
    assert slot_of(parse_request(body(user="ann")), "A") == slot_of(parse_request(body(safety_identifier="ann")), "B")


def test_a_reply_that_comes_back_has_the_id_its_worker_published_whole_or_quoted():
    replies = ReplyIndex()
    replies.add("chat-researcher", REPLY)
    # back as the assistant's own message, and forwarded whole to another agent
    for role in ("assistant", "user"):
        call = door_call(
            parse_request(body(messages=[{"role": "user", "content": "Notes?"}, {"role": role, "content": REPLY}])),
            replies,
            "r",
        )
        assert call.segment_ids[-1] == segment_id("chat-researcher", REPLY)
    # quoted inside another message: split around it
    quoting = f"Passage:\n{PASSAGE}\n\nNotes:\n{REPLY}\n\nWrite a summary."
    call = door_call(parse_request(body(messages=[{"role": "user", "content": quoting}])), replies, "r")
    parts = [p.segment for p in call.request.messages[0].parts]
    assert "".join(p.text for p in parts) == quoting
    assert [p.producer for p in parts] == [CLIENT, "chat-researcher", CLIENT]
    assert [p.placeholder for p in parts] == ["m0.0", "m0.1", "m0.2"]
    assert parts[1].id == segment_id("chat-researcher", REPLY)


def test_the_reply_index_prefers_the_longest_quote_and_finds_every_occurrence():
    replies = ReplyIndex(ReplyIndexConfig(min_quote_chars=10))
    inner = "a plan in three steps"
    outer = f"Draft built on {inner}, checked twice."
    replies.add("planner", inner)
    replies.add("writer", outer)
    assert replies.split(f"Review: {outer} Also: {inner}. And {inner}!") == [
        Piece("Review: ", None),
        Piece(outer, "writer"),
        Piece(" Also: ", None),
        Piece(inner, "planner"),
        Piece(". And ", None),
        Piece(inner, "planner"),
        Piece("!", None),
    ]
    assert replies.split("short") == [Piece("short", None)]
    replies.add("x", "Yes.")  # shorter than min_quote_chars: found only as a whole message
    assert replies.split("Yes.") == [Piece("Yes.", "x")] and replies.split("Yes. No.") == [Piece("Yes. No.", None)]


def test_the_reply_index_is_bounded_in_size_and_in_search_cost():
    config = ReplyIndexConfig(capacity=64, quote_window=16, min_quote_chars=8, max_quotes=4)
    replies = ReplyIndex(config)
    texts = [f"reply number {i:04d} says something" for i in range(200)]
    for text in texts:
        replies.add("a", text)
    assert len(replies) == 64 and replies.split(texts[0]) == [Piece(texts[0], None)]  # the oldest went
    old, new = texts[150], texts[199]  # remembered, but only the newest 16 are searched inside messages
    assert [p.producer for p in replies.split(f"x {old} y")] == [None]
    assert [p.producer for p in replies.split(f"x {new} y")] == [None, "a", None]
    many = " | ".join([new] * 10)
    assert sum(p.producer == "a" for p in replies.split(many)) == config.max_quotes
    big = "lorem ipsum dolor sit amet " * 4000  # 108k characters: well under 50 ms with 256 replies searched
    wide = ReplyIndex()
    for i in range(300):
        wide.add("a", f"another reply, number {i}, of a few dozen characters at least")
    started = time.perf_counter()
    wide.split(big)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(ValueError, match="quote_window"):
        ReplyIndexConfig(capacity=4, quote_window=8)


def test_serving_off_loopback_requires_an_api_key(monkeypatch):
    from kvmesh.runtime.serve import ServeConfig

    monkeypatch.delenv("KVMESH_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="requires an API key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv("KVMESH_API_KEY", "from-env")
    assert ServeConfig(host="0.0.0.0").api_key == "from-env"
    for bad in ({"port": 70000}, {"replicas": 0}, {"api_key": " "}, {"host": ""}, {"ingress": "nginx"}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)
    with pytest.raises(ConfigError, match="--replicas 2 needs --ingress serve"):
        ServeConfig(replicas=2)
    assert ServeConfig(replicas=2, ingress="serve").replicas == 2
