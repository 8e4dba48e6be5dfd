"""The engine on the real SmolLM2: continuous batching, chunked prefill, prefix cache, sampling, errors,
and faults: a request that fails inside a step fails alone; a full waiting queue refuses more."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch

from kvmesh.workers.engine import Engine, EngineConfig, RequestFailed, TokenEvent
from kvmesh.workers.engine_loop import EngineLoop
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.kv_slots import SlotKVCache
from kvmesh.workers.prefix_cache import PrefixCache, PrefixCacheConfig
from kvmesh.workers.prompt_reuse import PromptReuse
from kvmesh.workers.sampling import InvalidRequestError, SamplingParams, probabilities
from kvmesh.workers.sampling_limits import GREEDY_BELOW
from kvmesh.workers.scheduler import EngineOverloaded, SchedulerConfig

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "Explain in one sentence why the sky is blue, for a child who is five years old.",
]
GREEDY = SamplingParams(max_tokens=10)


def make_engine(model, tokenizer, *, prefix_cache: bool = True, max_batch_tokens: int = 256) -> Engine:
    return Engine(
        model,
        tokenizer,
        EngineConfig(
            scheduler=SchedulerConfig(max_running=8, max_batch_tokens=max_batch_tokens),
            prefix_cache=PrefixCacheConfig() if prefix_cache else None,
        ),
    )


@pytest.fixture(scope="module")
def prompts(model, tokenizer) -> list[list[int]]:
    engine = make_engine(model, tokenizer)
    return [engine.chat_prompt(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(model, tokenizer, prompts) -> list[list[int]]:
    """Greedy tokens of each prompt run by itself, with no cache reuse: the reference."""
    return [make_engine(model, tokenizer, prefix_cache=False).generate([p], GREEDY)[0].token_ids for p in prompts]


def test_first_answer_is_right(model, tokenizer, prompts):
    completion = make_engine(model, tokenizer).generate([prompts[0]], SamplingParams(max_tokens=16))[0]
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop"
    stats = completion.stats
    assert stats.prompt_tokens == len(prompts[0]) and stats.output_tokens == len(completion.token_ids)
    assert stats.ttft_s > 0 and stats.decode_tok_s > 0


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_batch_gives_the_same_greedy_tokens_as_each_alone(model, tokenizer, prompts, alone, prefix_cache):
    # a small token budget also forces chunked prefills to interleave with decodes
    engine = make_engine(model, tokenizer, prefix_cache=prefix_cache, max_batch_tokens=24)
    batch = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in batch] == alone
    if prefix_cache:  # the shared system-prompt blocks are reused on a second pass
        again = engine.generate(prompts, GREEDY)
        assert [c.token_ids for c in again] == alone
        assert all(c.stats.prefix_hit_tokens >= 16 for c in again)


def test_running_requests_decode_from_shared_kv_slots(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    for prompt in prompts:
        engine.add_request(prompt, GREEDY)
    engine.step()
    caches = [seq.cache for seq in engine.scheduler.running]
    assert len(caches) == len(prompts)
    assert all(isinstance(c, SlotKVCache) and c.slots is engine.kv_slots for c in caches)
    assert sorted(c.index for c in caches) == list(range(len(prompts)))


def test_prefix_cache_hit_gives_dense_logits(model, tokenizer):
    shared = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Tell me a story about a cat."}]))
    first = shared + tokenizer.encode("Once upon a time")
    second = shared + tokenizer.encode("There was a dog")
    cache = model.new_cache()
    model.forward(ForwardBatch.single(cache, first))
    prefix_cache = PrefixCache(PrefixCacheConfig(block_size=8))
    prefix_cache.insert(first, cache)

    match = prefix_cache.match(second, max_tokens=len(second) - 1)
    assert match.num_tokens == len(shared) // 8 * 8 > 0
    reused = model.new_cache()
    prefix_cache.load(match, reused)
    logits_reused = model.forward(ForwardBatch.single(reused, second[match.num_tokens :], all_logits=True))
    logits_dense = model.forward(ForwardBatch.single(model.new_cache(), second, all_logits=True))
    torch.testing.assert_close(logits_reused, logits_dense[match.num_tokens :], atol=1e-4, rtol=0)
    prefix_cache.release(match)


def test_long_prefill_does_not_stall_running_decodes(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer, prefix_cache=False, max_batch_tokens=32)
    short = engine.add_request(prompts[0], SamplingParams(max_tokens=40, ignore_eos=True))
    while not any(e.request_id == short for e in engine.step()):
        pass  # until the short request decodes
    long_prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "word " * 150}]))
    long = engine.add_request(long_prompt, SamplingParams(max_tokens=1))
    steps = 0
    while True:
        events = engine.step()
        steps += 1
        assert any(e.request_id == short for e in events), "the decode stalled while a prompt prefilled"
        if any(e.request_id == long for e in events):
            break
    assert steps >= len(long_prompt) // 32  # the long prompt really was spread over many steps


def test_stop_conditions(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    stopped = engine.generate([prompts[0]], SamplingParams(max_tokens=16, stop=(" Paris",)))[0]
    assert stopped.text == "The capital of France is" and stopped.finish_reason == "stop"
    capped = engine.generate([prompts[1]], SamplingParams(max_tokens=3))[0]
    assert len(capped.token_ids) == 3 and capped.finish_reason == "length"
    past_eos = engine.generate([prompts[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(past_eos.token_ids) == 12 and past_eos.text.startswith("The capital of France is Paris.")


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(model, tokenizer, prompts, alone):
    engine = make_engine(model, tokenizer)
    warm = SamplingParams(max_tokens=10, temperature=1.2, seed=7)
    first, second = engine.generate([prompts[1], prompts[1]], warm)
    assert first.token_ids == second.token_ids
    others = [engine.generate([prompts[1]], SamplingParams(max_tokens=10, temperature=1.2, seed=s))[0] for s in (8, 9)]
    assert any(o.token_ids != first.token_ids for o in others)
    nucleus_of_one = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    assert engine.generate([prompts[1]], nucleus_of_one)[0].token_ids == alone[1]


def test_cancel_ends_a_request(model, tokenizer, prompts):
    engine = make_engine(model, tokenizer)
    request = engine.add_request(prompts[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.cancel(request)
    events = engine.step()
    assert [(e.request_id, e.finished, e.finish_reason) for e in events] == [(request, True, "cancelled")]
    assert not engine.has_work() and not engine.cancel("no-such-request")


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([5] * 8192, SamplingParams(), "context is 8192"),
        ([1, 99999], SamplingParams(), "token ids must lie in"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(model, tokenizer, prompt, sampling, message):
    with pytest.raises(InvalidRequestError, match=message):
        make_engine(model, tokenizer).add_request(prompt, sampling)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2**32}, r"max_tokens must be an integer in \[1, 4294967295\]"),  # the wire's uint32
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"seed": -1}, r"seed must be None or an integer in \[0, 2\*\*64 - 1\]"),  # the wire's uint64
        ({"seed": 2**64}, r"seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_sampling_parameters_are_refused(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**fields)


def test_engine_loop_serves_concurrent_callers(model, tokenizer, prompts, alone):
    loop = EngineLoop(make_engine(model, tokenizer))
    results: dict[int, list[int]] = {}

    def call(index: int) -> None:
        results[index] = [e.token_id for e in loop.submit(prompts[index], GREEDY) if e.token_id is not None]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        list(loop.submit([], GREEDY))
    loop.close()
    assert [results[i] for i in range(len(prompts))] == alone


def test_a_tiny_temperature_samples_greedily_and_sampling_cannot_overflow(model, tokenizer, prompts, alone):
    # 1e-45 used to pass validation and divide the logits into inf, then NaN
    tiny = SamplingParams(max_tokens=10, temperature=1e-45, seed=1)
    assert tiny.greedy and make_engine(model, tokenizer).generate([prompts[1]], tiny)[0].token_ids == alone[1]
    logits = torch.tensor([30.0, 29.0, -5.0, float("-inf")])
    for top_p in (1.0, 0.5):
        probs = probabilities(logits, SamplingParams(temperature=GREEDY_BELOW, top_p=top_p))
        assert torch.isfinite(probs).all() and probs[0] == pytest.approx(1.0)


# -- faults: one request's failure is its own ------------------------------------------------------------------
def poisoned(sampling: SamplingParams) -> SamplingParams:
    """`sampling` with a NaN temperature, as a bug past validation would leave it: drawing from it raises."""
    object.__setattr__(sampling, "temperature", float("nan"))
    return sampling


def drain(engine: Engine) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    while engine.has_work():
        for event in engine.step():
            events[event.request_id].append(event)
    return events


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def assert_engine_is_clean(engine: Engine, failed_prompt: list[int], neighbour: list[int]) -> None:
    """Every KV slot is free again, and the failed request's KV did not enter the prefix cache."""
    assert not engine.has_work()
    assert all(engine.kv_slots.acquire() is not None for _ in range(engine.config.scheduler.max_running))
    assert engine.prefix_cache is not None
    shared = next(i for i, (a, b) in enumerate(zip(failed_prompt, neighbour, strict=False)) if a != b)
    match = engine.prefix_cache.match(failed_prompt)
    assert match.num_tokens <= shared  # at most what the neighbour put there
    engine.prefix_cache.release(match)


def test_a_request_whose_sampling_fails_fails_alone(model, tokenizer, prompts, alone):
    engine = make_engine(model, tokenizer)
    good = engine.add_request(prompts[0], GREEDY)
    bad = engine.add_request(prompts[1], poisoned(SamplingParams(max_tokens=10, temperature=0.7, seed=1)))
    first = engine.step()  # both prefill in this one step; the bad one fails at its first draw
    assert {e.request_id for e in first} == {good, bad}
    events = drain(engine)
    (failure,) = [e for e in first if e.request_id == bad]
    assert failure.finished and failure.finish_reason == "error" and "nan" in (failure.error or "")
    assert tokens_of([e for e in first if e.request_id == good] + events[good]) == alone[0]
    assert events[good][-1].finish_reason == "stop" and bad not in events
    assert_engine_is_clean(engine, prompts[1], prompts[0])


def test_through_the_loop_only_the_failed_request_s_caller_gets_the_error(model, tokenizer, prompts, alone):
    loop = EngineLoop(make_engine(model, tokenizer))
    good = loop.submit(prompts[2], GREEDY)
    bad = loop.submit(prompts[3], poisoned(SamplingParams(max_tokens=10, temperature=0.7)))
    with pytest.raises(RequestFailed, match=r"request 'loop-2' failed: RuntimeError: .*nan"):
        list(bad)
    assert tokens_of(list(good)) == alone[2]
    again = loop.submit(prompts[3], GREEDY)  # the loop and the engine go on serving
    assert tokens_of(list(again)) == alone[3]
    loop.close()


def _raises(*args: object) -> tuple[int, int]:
    raise RuntimeError("the reuse hook exploded")


REUSE_FAULTS: dict[str, Callable[[], PromptReuse]] = {
    "splice at admission": lambda: PromptReuse(splice_at=0, splice_fn=_raises),
    "splice after a prefill chunk": lambda: PromptReuse(splice_at=10, splice_fn=_raises),
    "on_prefilled": lambda: PromptReuse(on_prefilled=_raises),
    "on_finished": lambda: PromptReuse(on_finished=_raises),
}


@pytest.mark.parametrize("fault", list(REUSE_FAULTS))
def test_a_request_whose_reuse_hook_raises_fails_alone(model, tokenizer, prompts, alone, fault):
    engine = make_engine(model, tokenizer)
    good = engine.add_request(prompts[0], GREEDY)
    bad = engine.add_request(prompts[1], GREEDY, reuse=REUSE_FAULTS[fault]())
    events = drain(engine)
    assert tokens_of(events[good]) == alone[0] and events[good][-1].finish_reason == "stop"
    end = events[bad][-1]
    assert end.finish_reason == "error" and end.error == "RuntimeError: the reuse hook exploded"
    assert_engine_is_clean(engine, prompts[1], prompts[0])


def test_the_waiting_queue_is_bounded_and_what_it_took_completes(model, tokenizer, prompts):
    max_waiting = 4
    config = SchedulerConfig(max_running=2, max_batch_tokens=128, max_waiting=max_waiting)
    engine = Engine(model, tokenizer, EngineConfig(scheduler=config))
    quick = SamplingParams(max_tokens=2, ignore_eos=True)
    taken, refused = [], []
    for i in range(max_waiting + 50):
        try:
            taken.append(engine.add_request(prompts[i % len(prompts)], quick))
        except EngineOverloaded as exc:
            refused.append(str(exc))
    assert len(taken) == max_waiting and len(refused) == 50
    assert "4 requests already wait (SchedulerConfig.max_waiting=4)" in refused[0]
    events = drain(engine)
    assert all(len(tokens_of(events[i])) == 2 and events[i][-1].finish_reason == "length" for i in taken)

    # through the loop, as the worker service sees it: the excess is refused on its own stream, the rest complete
    loop = EngineLoop(Engine(model, tokenizer, EngineConfig(scheduler=config)))
    streams = [loop.submit(prompts[i % len(prompts)], quick) for i in range(max_waiting + 50)]
    completed = overloaded = 0
    for stream in streams:
        try:
            completed += len(tokens_of(list(stream))) == 2
        except EngineOverloaded:
            overloaded += 1
    loop.close()
    assert completed + overloaded == max_waiting + 50 and completed >= max_waiting and overloaded >= 1
