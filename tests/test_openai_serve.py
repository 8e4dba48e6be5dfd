"""`kvmesh serve` through real clients: the openai library, curl, raw HTTP, and a LangGraph app left unchanged.

One server for the module (a Session with one SmolLM2 worker behind the default ingress, uvicorn in the driver,
an API key required), and once the same workers behind a Ray Serve ingress; the `kvmesh serve` command itself
runs once as a subprocess, as a user starts and Ctrl-Cs it.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit

import pytest
import ray

from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.runtime import Session
from kvmesh.runtime.reply_index import ReplyIndexConfig
from kvmesh.runtime.serve import OpenAIServer, ServeConfig
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-" + secrets.token_hex(8)
PASSAGE = (
    "The river Arlen floods its valley every spring, and each summer the people of Dunmere rebuild the "
    "mills, the bridges and the long stone wall that the water took."
)


class State(TypedDict, total=False):  # the LangGraph app's state
    passage: str
    notes: str
    draft: str
    review: str


@pytest.fixture(scope="module")
def served(ray_cluster):
    with Session(workers=1) as session, OpenAIServer(session, ServeConfig(port=0, api_key=KEY)) as server:
        yield session, server


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1].base_url, api_key=KEY, max_retries=0)


def post(url: str, payload: bytes, key: str | None = KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ask(text: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
    } | fields


def worker_stats(session: Session) -> worker_pb2.WorkerStats:
    (entry,) = ray.get(session.registry.workers.remote())
    return worker_pb2_grpc.WorkerServiceStub(session.channels.get(entry.address)).Stats(worker_pb2.StatsRequest())


def test_kvmesh_serve_prints_its_url_answers_and_stops_cleanly_on_ctrl_c():
    env = os.environ | {"RAY_ADDRESS": ""}  # its own embedded cluster
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmesh", "serve", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()  # printed once everything is up
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), url
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
            assert json.loads(response.read()) == {"status": "ok", "workers": 1}
        status, reply = post(url + "/chat/completions", json.dumps(ask("Say hi.")).encode(), key=None)
        assert status == 200 and reply["choices"][0]["message"]["content"], reply
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hung: its log so far, after a kill
            process.kill()
            _, stderr = process.communicate(timeout=30)
            pytest.fail(f"`kvmesh serve` did not stop within 120 s of Ctrl-C; its stderr ends:\n{stderr[-3000:]}")
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping the server" in stderr
    port = urlsplit(url).port
    assert port not in {p for p, _ in listening()}, "the HTTP port is still open after Ctrl-C"


def test_plain_completion_carries_usage_cached_tokens_and_the_kvmesh_object(client):
    system = {"role": "system", "content": "You are terse."}
    for _ in range(2):  # the second finds the first's system prompt in the prefix cache
        reply = client.chat.completions.create(
            model="smollm2", messages=[system, {"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0,
        )  # fmt: skip
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12
    assert usage.prompt_tokens_details.cached_tokens > 0
    kvmesh = reply.model_extra["kvmesh"]
    assert set(kvmesh) >= {
        "reused_tokens",
        "cached_tokens",
        "reuse_mode",
        "segment_modes",
        "segment_reasons",
        "degradations",
        "slot",
        "worker",
        "ttft_s",
    }
    assert usage.prompt_tokens_details.cached_tokens == kvmesh["cached_tokens"] + kvmesh["reused_tokens"]
    (segment,) = kvmesh["segment_modes"]  # the user message, by content
    assert segment == segment_id("client", "What is the capital of France?")
    assert kvmesh["segment_reasons"][segment] and kvmesh["ttft_s"] > 0


def test_streaming_sends_the_text_then_a_usage_chunk_with_no_choices(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens <= 10 and last.usage.prompt_tokens > 0
    assert last.model_extra["kvmesh"]["reuse_mode"] in ("dense", "prefix", "kvcomm")
    assert all(c.usage is None for c in chunks[:-1])


def test_curl_sees_raw_server_sent_events_ending_in_done(served):
    _, server = served
    payload = json.dumps(ask("Say hello.", stream=True))
    result = subprocess.run(
        ["curl", "-sN", f"{server.base_url}/chat/completions", "-H", f"Authorization: Bearer {KEY}",
         "-H", "Content-Type: application/json", "-d", payload, "-D", "-"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    head, _, events = result.stdout.partition("\n\n")  # (text mode reads \r\n as \n)
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    lines = [line for line in events.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    final = chunks[-1]  # without include_usage, kvmesh rides on the finish-reason chunk
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and "reuse_mode" in final["kvmesh"]


def test_bad_requests_get_openai_error_objects(served, client):
    from openai import BadRequestError, NotFoundError

    _, server = served
    url = f"{server.base_url}/chat/completions"
    status, body = post(url, b'{"model": "smollm2", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(url, json.dumps(ask("Hi")).encode(), key=None)
    assert status == 401 and "no API key" in body["error"]["message"]
    status, body = post(url, json.dumps(ask("Hi")).encode(), key="sk-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(**ask("Hi", model="gpt-4o"))
    assert missing.value.body["code"] == "model_not_found" and "smollm2" in missing.value.body["message"]
    for fields, param in (({"temperature": 5}, "temperature"), ({"n": 3}, "n"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(BadRequestError) as bad:
            client.chat.completions.create(**ask("Hi", **fields))
        assert bad.value.body["param"] == param, bad.value.body
    with pytest.raises(BadRequestError) as too_long:  # streamed or not: a plain 400 before any event
        client.chat.completions.create(**ask("lorem ipsum " * 5000, stream=True))
    message = too_long.value.body["message"]
    assert too_long.value.body["code"] == "context_length_exceeded" and "8192" in message
    assert int(message.split("the prompt has ")[1].split()[0]) > 8192  # both lengths named
    status, body = post(server.base_url.removesuffix("/v1") + "/v2/nothing", b"{}")
    assert status == 404 and body["error"]["message"]
    assert [m.id for m in client.models.list()] == ["smollm2"]
    health = urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/health", timeout=30)  # no key needed
    assert json.loads(health.read()) == {"status": "ok", "workers": 1}


def test_a_client_that_disconnects_mid_stream_cancels_its_request_in_the_engine(served):
    session, server = served
    url = urlsplit(server.base_url)
    payload = json.dumps(ask("Count from 1 to 3000, one number per line.", max_tokens=3000, stream=True))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request(
        "POST",
        url.path + "/chat/completions",
        payload,
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 6:  # a few tokens in: the request is decoding
        if response.readline().startswith(b"data: "):
            events += 1
    assert worker_stats(session).running == 1
    closed = time.monotonic()
    connection.sock.close()  # gone, as a client that crashes or hits Ctrl-C
    connection.close()
    while (stats := worker_stats(session)).running or stats.waiting:
        assert time.monotonic() - closed < 15, "the engine still runs the abandoned request"
        time.sleep(0.1)  # 3000 tokens would take minutes: it was cancelled, its KV slot freed


def test_the_http_server_listens_on_loopback_only(served):
    _, server = served
    port = urlsplit(server.base_url).port
    addresses = {address for p, address in listening() if p == port}
    assert addresses == {"127.0.0.1"}, addresses


def test_a_ray_serve_ingress_serves_the_same_workers_with_the_same_key_on_loopback(served):
    from openai import AuthenticationError, OpenAI

    session, _ = served
    with OpenAIServer(session, ServeConfig(port=0, api_key=KEY, ingress="serve")) as server:
        port = urlsplit(server.base_url).port
        assert {address for p, address in listening() if p == port} == {"127.0.0.1"}
        reply = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0).chat.completions.create(
            **ask("Name a colour.")
        )
        assert reply.choices[0].message.content and reply.model_extra["kvmesh"]["worker"]
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).chat.completions.create(**ask("Hi."))
    deadline = time.monotonic() + 15  # Serve's proxy actor is killed, not joined
    while port in {p for p, _ in listening()}:
        assert time.monotonic() < deadline, "Serve's proxy still listens after close()"
        time.sleep(0.2)


def test_a_reply_coming_back_whole_or_quoted_has_the_id_its_worker_published(client):
    system = {"role": "system", "content": "You are a geography tutor."}
    question = {"role": "user", "content": "Describe Lima, the capital of Peru."}
    first = client.chat.completions.create(model="smollm2", messages=[system, question], max_tokens=24, temperature=0)
    reply, slot = first.choices[0].message.content, first.model_extra["kvmesh"]["slot"]
    assert len(reply) >= ReplyIndexConfig().min_quote_chars  # shorter replies are found only as whole messages
    published = segment_id(slot, reply)  # the worker publishes every reply as segment_id(agent, text)
    follow_up = client.chat.completions.create(
        model="smollm2", max_tokens=8, temperature=0,
        messages=[system, question, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}],
    )  # fmt: skip
    assert published in follow_up.model_extra["kvmesh"]["segment_modes"]
    checker = client.chat.completions.create(
        model="smollm2", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You check answers."},
                  {"role": "user", "content": f"The answer was:\n{reply}\nIs it right?"}],
    )  # fmt: skip
    kvmesh = checker.model_extra["kvmesh"]
    assert kvmesh["slot"] != slot and published in kvmesh["segment_modes"]
    assert len(kvmesh["segment_modes"]) == 3  # the text before, the reply, the text after


def test_thirty_two_concurrent_streams_all_finish(client):
    def stream(number: int) -> str:
        chunks = client.chat.completions.create(**ask(f"Say the number {number}.", max_tokens=4, stream=True))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(stream, range(32)))
    assert all(texts)


def test_a_langgraph_app_runs_unchanged_and_its_agents_reuse_each_others_kv(served):
    """Three agents (researcher -> writer -> reviewer), each a ChatOpenAI call with its own system prompt over
    the same passage; the writer quotes the researcher's notes, the reviewer the writer's draft. Nothing in the
    app knows of kvmesh; the test reads the `kvmesh` fields off the wire with an httpx event hook."""
    import httpx
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph

    _, server = served
    wire: list[dict[str, Any]] = []

    def record(response: httpx.Response) -> None:
        response.read()
        wire.append(response.json())

    llm = ChatOpenAI(
        base_url=server.base_url,
        api_key=KEY,
        model="smollm2",
        temperature=0,
        max_tokens=24,
        http_client=httpx.Client(event_hooks={"response": [record]}),
    )

    def researcher(state: dict) -> dict:
        notes = llm.invoke([SystemMessage("You are a researcher. List the key facts."), HumanMessage(state["passage"])])
        return {"notes": notes.content}

    def writer(state: dict) -> dict:
        draft = llm.invoke(
            [
                SystemMessage("You are a writer."),
                HumanMessage(state["passage"]),
                HumanMessage(f"Research notes:\n{state['notes']}\n\nWrite a short summary."),
            ]
        )
        return {"draft": draft.content}

    def reviewer(state: dict) -> dict:
        review = llm.invoke(
            [
                SystemMessage("You are a strict reviewer."),
                HumanMessage(state["passage"]),
                HumanMessage(f"Draft:\n{state['draft']}\n\nName one error, or say it is correct."),
            ]
        )
        return {"review": review.content}

    graph = StateGraph(State)
    for name, node in (("researcher", researcher), ("writer", writer), ("reviewer", reviewer)):
        graph.add_node(name, node)
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", "writer")
    graph.add_edge("writer", "reviewer")
    graph.add_edge("reviewer", END)
    app = graph.compile()

    runs = 8
    for _ in range(runs):  # auto reuses once its guard's audits of the dense calls pass (3 in a row)
        state = app.invoke({"passage": PASSAGE})
        assert state["review"], state
        researcher_call, writer_call, reviewer_call = (call["kvmesh"] for call in wire[-3:])
        notes_id = segment_id(researcher_call["slot"], state["notes"])
        draft_id = segment_id(writer_call["slot"], state["draft"])
        assert notes_id in writer_call["segment_modes"] and draft_id in reviewer_call["segment_modes"]
        passage_id = segment_id("client", PASSAGE)  # one segment for all three agents
        assert all(passage_id in call["segment_modes"] for call in (researcher_call, writer_call, reviewer_call))
        if writer_call["segment_modes"][notes_id] == "kvcomm":
            break
    else:
        pytest.fail(f"the writer never reused the researcher's notes in {runs} runs: {writer_call}")
    assert writer_call["reuse_mode"] == "kvcomm" and writer_call["reused_tokens"] > 0
    assert reviewer_call["segment_modes"][draft_id] == "kvcomm" and reviewer_call["reused_tokens"] > 0


def listening() -> set[tuple[int, str]]:
    """(port, address) of every listening TCP socket, from the kernel's table (/proc/net/tcp, tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            found.add((int(port, 16), _address(address, width)))
    return found


def _address(hex_address: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four host-order words
    ip = ipaddress.IPv6Address(words)
    return str(ip.ipv4_mapped or ip)


def test_listening_reads_the_kernels_table():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        assert (probe.getsockname()[1], "127.0.0.1") in listening()
