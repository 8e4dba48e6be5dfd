"""The reuse planner and the engine together: splices, anchors learned from dense calls, published responses."""

from __future__ import annotations

import msgpack
import pytest
import redis

from kvmesh.kvcomm.anchor_match import MatchConfig
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.redis_store import RedisStore
from kvmesh.kvcomm.segment_id import segment_id
from kvmesh.kvcomm.store import MemoryStore, PoolConfig, StoredSegment
from kvmesh.workers.blend import BlendConfig
from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.prompt_reuse import PromptReuse
from kvmesh.workers.reuse_planner import PlannedCall, PromptPart
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.segment_base import base_alone
from kvmesh.workers.worker import WorkerConfig, build_worker

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=12)
COUNTRIES = ["France", "Italy", "Spain", "Germany", "Japan", "Egypt", "Russia", "Greece", "Norway", "Peru"]


def make_engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer, EngineConfig(speculation=None))


def run(engine: Engine, ids: list[int], reuse: PromptReuse | None = None, sampling=GREEDY):
    request = engine.add_request(ids, sampling, reuse=reuse)
    tokens = []
    while True:
        for event in engine.step():
            if event.request_id == request:
                if event.token_id is not None:
                    tokens.append(event.token_id)
                if event.finished:
                    return tokens, event.stats


def test_splicing_the_exact_kv_reproduces_the_dense_reply(model, tokenizer):
    engine = make_engine(model, tokenizer)
    ids = engine.chat_prompt("Name three rivers in Europe and one fact about each.")
    dense_tokens, _ = run(make_engine(model, tokenizer), ids)
    exact = model.new_cache()
    model.forward(ForwardBatch.single(exact, ids))
    start, end = 20, len(ids) - 5
    tokens, stats = run(engine, ids, PromptReuse(splice_at=start, splice_kv=exact.slice(start, end)))
    assert tokens == dense_tokens and stats.reused_tokens == end - start
    # the spliced range never enters the exact prefix cache (spliced KV is approximate in general)
    assert engine.prefix_cache.match(ids).num_tokens <= start


def test_a_splice_that_leaves_no_token_to_compute_is_refused(model, tokenizer):
    engine = make_engine(model, tokenizer)
    ids = engine.chat_prompt("Hello")
    whole = model.new_cache()
    model.forward(ForwardBatch.single(whole, ids))
    with pytest.raises(ValueError, match="leave its last token"):
        engine.add_request(ids, GREEDY, reuse=PromptReuse(splice_at=0, splice_kv=whole.slice(0)))


def query_of(country: str) -> str:
    return f"I am planning a trip to {country}. What is the capital city of {country}?"


class TwoAgents:
    """researcher(query) -> answerer(query, researcher): the worker side of a 2-agent pipeline, in-process,
    put together as the runtime's worker is (build_worker), without speculation or warm-up."""

    def __init__(self, model, tokenizer, store, config: MatchConfig | None = None, **settings_) -> None:
        settings = WorkerConfig(
            engine=EngineConfig(speculation=None), match=config or MatchConfig(), warm_up=False, **settings_
        )
        worker = build_worker(settings, store, model=model, tokenizer=tokenizer)
        self.engine, self.planner = worker.engine, worker.planner
        self.planned: list[PlannedCall] = []  # every call's plan, in order (the researcher's too)

    def call(self, agent: str, system: str, parts: list[PromptPart], mode: str, max_tokens: int):
        planned = self.planner.plan(system, parts, agent, mode)
        self.planned.append(planned)
        tokens, stats = run(self.engine, planned.token_ids, planned.reuse, SamplingParams(max_tokens=max_tokens))
        self.planner.drain()
        text = self.engine.tokenizer.decode([t for t in tokens if t not in self.engine.tokenizer.eos_token_ids])
        return text, planned, stats

    def pipeline(self, country: str, mode: str):
        q = PromptPart(query_of(country), segment_id("query", query_of(country)), "query")
        notes, _, _ = self.call(
            "researcher",
            "You are a travel researcher.",
            [PromptPart("Write two sentences about the country in this request.\n\n"), q],
            mode,
            32,
        )
        parts = [
            PromptPart("Request: "),
            q,
            PromptPart("\n\nResearch notes:\n"),
            PromptPart(notes, segment_id("researcher", notes), "researcher"),
            PromptPart("\n\nAnswer the request in one short sentence."),
        ]
        return self.call("answerer", "You are a helpful travel agent.", parts, mode, 12)


def test_anchors_learned_from_dense_calls_serve_later_calls_close_to_dense(model, tokenizer):
    # lenient: vouch whenever two anchors cover a segment (free-form notes differ a lot token by token);
    # this test is about the mechanism, the thresholds are calibrated by `kvmesh bench kvcomm`
    agents = TwoAgents(model, tokenizer, MemoryStore(), MatchConfig(max_distance=5.0, entropy_gamma=1.0))
    first = [agents.pipeline(c, "kvcomm")[1].stats for c in COUNTRIES[:4]]
    # no anchors yet: served by the prefix cache and prefill, and the real KV recorded as anchors
    assert [s.mode for s in first[:2]] == ["prefix", "prefix"]
    assert set(first[0].segment_modes.values()) == {"dense"}
    assert all("0 anchors, longest 0" in why for why in first[0].segment_reasons.values())
    served = agents.pipeline(COUNTRIES[6], "kvcomm")
    dense = TwoAgents(model, tokenizer, MemoryStore()).pipeline(COUNTRIES[6], "dense")
    text, planned, stats = served
    assert planned.stats.mode == "kvcomm", planned.stats.segment_reasons
    assert all(why.startswith("vouched for by") for why in planned.stats.segment_reasons.values())
    assert stats.reused_tokens == planned.stats.reused_tokens > 0
    assert stats.prefix_hit_tokens > 0  # the template head before the first segment came from the exact cache
    assert text.split()[:4] == dense[0].split()[:4], (text, dense[0])


def test_kvcomm_repair_blends_over_the_corrected_kv_where_the_anchors_vouch(model, tokenizer):
    lenient = MatchConfig(max_distance=5.0, entropy_gamma=1.0)
    agents = TwoAgents(model, tokenizer, MemoryStore(), lenient, kvcomm_repair=BlendConfig(share=0.3))
    for country in COUNTRIES[:4]:
        agents.pipeline(country, "kvcomm")
    _, planned, stats = agents.pipeline(COUNTRIES[6], "kvcomm")
    span = planned.layout.reuse_end - planned.layout.reuse_start
    assert planned.stats.mode == "kvcomm+blend" and set(planned.stats.segment_modes.values()) == {"kvcomm+blend"}
    assert 0 < planned.stats.blend_recomputed < span and stats.reused_tokens == span - planned.stats.blend_recomputed


def test_the_chunks_of_one_placeholder_have_a_pool_each_so_their_anchors_hold_the_text_after_them(model, tokenizer):
    """A tool returning a list puts several segments in one placeholder; the last is followed by the template
    (not the separator), so one pool for all would hold anchors of unlike next texts and vouch for none."""
    lenient = MatchConfig(max_distance=5.0, entropy_gamma=1.0, max_spread=float("inf"))
    agents = TwoAgents(model, tokenizer, MemoryStore(), lenient)

    def ask(country: str):
        facts = [f"{country} has many mountains.", f"{country} has a long coast.", f"{country} grows olives."]
        parts = [PromptPart("Facts:\n")]
        for index, fact in enumerate(facts):
            if index:
                parts.append(PromptPart("\n\n"))
            parts.append(PromptPart(fact, segment_id("facts", fact), "facts"))
        parts.append(PromptPart("\n\nWhich of these is about the sea?"))
        return agents.call("reader", "You are brief.", parts, "kvcomm", 4)[1]

    first = ask(COUNTRIES[0])
    slots = [span.slot.rsplit("|", 1)[1] for span in first.layout.segments()]
    assert slots == ["facts", "facts#1", "facts#2"]
    for country in COUNTRIES[1:4]:
        ask(country)
    served = ask(COUNTRIES[5])
    assert served.stats.mode == "kvcomm", served.stats.segment_reasons


def test_responses_are_published_as_segments_with_their_decode_kv(model, tokenizer):
    store = MemoryStore()
    agents = TwoAgents(model, tokenizer, store)
    text, _, _ = agents.call("writer", "You are brief.", [PromptPart("Say something about tea.")], "kvcomm", 10)
    published = store.get_segment(segment_id("writer", text))
    assert published is not None and tokenizer.decode(published.token_ids) == text
    assert published.kv.length == len(published.token_ids)


def test_a_lost_store_degrades_to_dense_with_correct_output(model, tokenizer):
    server = EmbeddedRedis()
    agents = TwoAgents(model, tokenizer, RedisStore(server.url))
    server.stop()
    text, planned, _ = agents.pipeline(COUNTRIES[0], "kvcomm")
    dense_text, _, _ = TwoAgents(model, tokenizer, MemoryStore()).pipeline(COUNTRIES[0], "dense")
    assert planned.stats.mode in ("dense", "prefix")
    reasons = planned.stats.segment_reasons
    assert reasons and all(why.startswith("KV store unavailable") and "unreachable" in why for why in reasons.values())
    assert planned.stats.degradations == [next(iter(reasons.values()))]  # said once, for the whole call
    assert text == dense_text


def test_blend_mode_repairs_the_moved_segments_in_the_engine(model, tokenizer):
    agents = TwoAgents(model, tokenizer, MemoryStore())
    text, planned, stats = agents.pipeline(COUNTRIES[1], "blend")
    span = planned.layout.reuse_end - planned.layout.reuse_start
    assert planned.stats.mode == "blend" and planned.stats.reused_tokens == span
    assert 0 < planned.stats.blend_recomputed < span  # the default share: ~15% of the span
    assert stats.reused_tokens == span - planned.stats.blend_recomputed
    dense_text, _, _ = TwoAgents(model, tokenizer, MemoryStore()).pipeline(COUNTRIES[1], "dense")
    assert text.split()[:3] == dense_text.split()[:3], (text, dense_text)


def test_auto_never_blends_until_its_guard_opens_it_runs_dense_and_says_why(model, tokenizer):
    never_fits = MatchConfig(max_distance=1e-6)  # warm pools, but no segment is ever close enough
    agents = TwoAgents(model, tokenizer, MemoryStore(), never_fits)
    calls = [agents.pipeline(country, "auto") for country in COUNTRIES[:3]]
    assert [planned.stats.mode for _, planned, _ in calls] == ["prefix"] * 3  # dense (with the exact prefix)
    _, warm, stats = calls[2]
    assert stats.reused_tokens == 0 and warm.stats.blend_recomputed == 0
    assert set(warm.stats.segment_modes.values()) == {"dense"}
    assert all("auto's guard: 0 of 3 audits" in why for why in warm.stats.segment_reasons.values()), (
        warm.stats.segment_reasons
    )
    assert warm.stats.anchors_consulted == 0  # a closed template matches nothing on the critical path
    dense_text, _, _ = TwoAgents(model, tokenizer, MemoryStore()).pipeline(COUNTRIES[2], "dense")
    assert calls[2][0] == dense_text  # dense KV (prefix cache + prefill): the same greedy reply


def test_dense_and_prefix_calls_say_why_their_segments_were_not_reused(model, tokenizer):
    agents = TwoAgents(model, tokenizer, MemoryStore())
    for mode in ("dense", "prefix"):
        _, planned, _ = agents.pipeline(COUNTRIES[3], mode)
        assert len(planned.stats.segment_reasons) == 2  # the query and the researcher's notes
        assert all(f"reuse={mode!r} was asked" in why for why in planned.stats.segment_reasons.values())


# -- a poisoned or bounded store never fails a call nor changes its answer ----------------------------------
@pytest.fixture
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def dense_answer(model, tokenizer, country: str) -> str:
    return TwoAgents(model, tokenizer, MemoryStore()).pipeline(country, "dense")[0]


def forge_query_segment(model, tokenizer, url: str, country: str, donor: str) -> None:
    """What an attacker with Redis access but no secret can write: `country`'s query tokens with `donor`'s
    KV from layer 2 up, under the query's segment id (it made blend answer with the donor's capital)."""
    header = TwoAgents(model, tokenizer, None).planner._user_header
    ids, donor_ids = tokenizer.encode(query_of(country)), tokenizer.encode(query_of(donor))
    assert len(ids) == len(donor_ids)
    crafted, donor_kv = base_alone(model, header, ids), base_alone(model, header, donor_ids)
    crafted.keys[2:, :, : len(ids)] = donor_kv.keys[2:, :, : len(ids)]
    crafted.values[2:, :, : len(ids)] = donor_kv.values[2:, :, : len(ids)]
    forger = RedisStore(url, secret="not the session's secret")
    forger.put_segment(segment_id("query", query_of(country)), StoredSegment(ids, crafted))


def test_a_forged_segment_is_dropped_said_and_changes_no_answer(model, tokenizer, redis_server):
    for mode, reference in (
        ("auto", dense_answer(model, tokenizer, "France")),
        ("blend", TwoAgents(model, tokenizer, MemoryStore()).pipeline("France", "blend")[0]),
    ):
        forge_query_segment(model, tokenizer, redis_server.url, "France", "Germany")
        agents = TwoAgents(model, tokenizer, RedisStore(redis_server.url))
        text, _, _ = agents.pipeline("France", mode)
        assert text == reference, mode  # blend repaired the query's true base KV, not the forged one
        researcher = agents.planned[0].stats
        query_id = segment_id("query", query_of("France"))
        assert researcher.degradations == [f"dropped a tampered segment {query_id} (bad HMAC)"]
        assert agents.planned[1].stats.degradations == []  # dropped (deleted): the answerer found the true one


def test_garbage_anchors_are_skipped_once_and_fail_no_later_call(model, tokenizer, redis_server):
    agents = TwoAgents(model, tokenizer, RedisStore(redis_server.url))
    agents.pipeline("Italy", "kvcomm")  # records anchors in both agents' slots
    client = redis.Redis.from_url(redis_server.url)
    pools = client.keys("kvmesh:pool:*")
    assert len(pools) == 3  # the researcher's query; the answerer's query and notes
    for pool in pools:
        client.zadd(pool, {"junk": 0.0, "no-record": 0.0})
    client.set("kvmesh:anchor:junk", msgpack.packb({"id": "junk"}))  # old code: KeyError 'next_text', every call
    fresh = TwoAgents(model, tokenizer, RedisStore(redis_server.url))  # another worker: nothing cached
    text, _, _ = fresh.pipeline("Spain", "kvcomm")
    assert text == dense_answer(model, tokenizer, "Spain")  # one real anchor per slot: too few, the call ran dense
    lines = [line for planned in fresh.planned for line in planned.stats.degradations]
    assert lines == ["dropped a tampered anchor junk (not a sealed kvmesh record)"]
    assert all(client.zscore(pool, "junk") is None and client.zscore(pool, "no-record") is None for pool in pools)
    fresh.pipeline("Norway", "kvcomm")
    assert [line for planned in fresh.planned[2:] for line in planned.stats.degradations] == []


def test_a_store_that_fails_every_write_and_holds_junk_fails_no_call(model, tokenizer, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "noeviction")
    reference = dense_answer(model, tokenizer, "Peru")
    for mode in ("dense", "kvcomm"):
        client.config_set("maxmemory", 0)
        client.set(f"kvmesh:segment:{segment_id('query', query_of('Peru'))}", b"\x81\xa1a\x01garbage")
        client.config_set("maxmemory", 1)  # every write now fails: "OOM command not allowed"
        agents = TwoAgents(model, tokenizer, RedisStore(redis_server.url))
        text, _, _ = agents.pipeline("Peru", mode)
        assert text == reference, mode
        researcher = agents.planned[0].stats
        assert any(line.startswith("dropped a tampered segment query:") for line in researcher.degradations)
        if mode == "kvcomm":  # its base KV could not be stored: the call ran dense and said why
            refused = [line for line in researcher.degradations if line.startswith("KV store failed:")]
            assert len(refused) == 1 and "not allowed when used memory > 'maxmemory'" in refused[0]
            assert list(researcher.segment_reasons.values()) == refused


def test_a_segment_over_the_per_record_cap_is_not_stored_and_its_reason_says_so(model, tokenizer, redis_server):
    capped = RedisStore(redis_server.url, PoolConfig(record_max_bytes=64 << 10))  # < one 16-token query's KV
    agents = TwoAgents(model, tokenizer, capped)
    text, _, _ = agents.pipeline("Kenya", "kvcomm")
    assert text == dense_answer(model, tokenizer, "Kenya")
    (why,) = agents.planned[0].stats.segment_reasons.values()
    assert "its base KV was not stored: " in why and "over the per-record cap of 64.0 KiB" in why
    assert redis.Redis.from_url(redis_server.url).keys("kvmesh:segment:*") == []  # responses were not kept either
