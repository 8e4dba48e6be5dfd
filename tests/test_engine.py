"""The engine on the real SmolLM2: continuous batching, chunked prefill, prefix cache, sampling, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.engine_loop import EngineLoop
from kvmesh.workers.forward_batch import ForwardBatch
from kvmesh.workers.kv_slots import SlotKVCache
from kvmesh.workers.prefix_cache import PrefixCache, PrefixCacheConfig
from kvmesh.workers.sampling import InvalidRequestError, SamplingParams
from kvmesh.workers.scheduler import SchedulerConfig

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
        ({"max_tokens": 0}, "max_tokens"),
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
