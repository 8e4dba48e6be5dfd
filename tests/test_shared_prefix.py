"""A prefix-cache hit read in place (shared_prefix.py): the same KV and logits as a copy of it, no copy made.

The model-level tests use the tiny random Llama (GQA, 2 layers) against dense private caches; the engine tests
run the real SmolLM2 with sharing on and off and compare greedy tokens, hooks and what enters the prefix cache.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_kv_slots import decode_batch, make_slots, prefill

from kvmesh.bench.bench_common import SAMPLE_TEXT
from kvmesh.workers.engine import Completion, Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.prefix_cache import PrefixCache, PrefixCacheConfig
from kvmesh.workers.prompt_reuse import PromptReuse
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.scheduler import SchedulerConfig
from kvmesh.workers.shared_prefix import scores_with_lse, with_lse
from kvmesh.workers.speculation import SpeculationConfig


def _tree_with_two_pieces(model, context: list[int]) -> PrefixCache:
    """A prefix cache holding `context` as two nodes (a second request diverged after 16 tokens)."""
    tree = PrefixCache(PrefixCacheConfig(block_size=8))
    for ids in (context, context[:16] + [3] * 16):
        cache = model.new_cache()
        prefill(model, cache, ids)
        tree.insert(ids, cache)
    return tree


def test_with_lse_paths_agree_with_sdpa() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=gen) for _ in range(3))
    k, v = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 3, 9, 16, generator=gen)
    allowed = torch.rand(2, 1, 5, 9, generator=gen) > 0.4
    allowed[..., 0] = True
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    scores = (q @ k.transpose(-1, -2)) * 16**-0.5 + bias
    for out, lse in (with_lse(q, k, v, bias), scores_with_lse(q, k, v, bias)):
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=0)


def test_sequences_over_a_shared_prefix_compute_what_copies_compute(tiny_model) -> None:
    gen = torch.Generator().manual_seed(1)
    context = torch.randint(3, 256, (40,), generator=gen).tolist()
    tree = _tree_with_two_pieces(tiny_model, context)
    tails = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (1, 6, 11)]
    slots = make_slots(tiny_model, num_slots=5, capacity=80)
    stranger = slots.acquire()  # a sequence without the prefix in the same buffer, between the sharers
    shared, copied = [], []
    for tail in tails:
        match = tree.match(context + tail, max_tokens=len(context))
        assert match.num_tokens == 40 and len(match.nodes) == 2
        own = slots.acquire()
        own.share(tree.share(match))
        assert own.length == 40 and own.keys[:, :, :40].abs().sum() == 0  # nothing copied into the slot
        private = tiny_model.new_cache()
        tree.load(match, private)
        shared.append(own)
        copied.append(private)
    reference_stranger = tiny_model.new_cache()
    for cache, ids in ((stranger, context[:5]), (reference_stranger, context[:5])):
        prefill(tiny_model, cache, ids)
    # prompt chunks after the prefix (several tokens, causal) in one forward, then batched decodes
    for caches in (shared, copied):
        batch = ForwardBatch(
            torch.tensor([t for tail in tails for t in tail]),
            torch.tensor([40 + i for tail in tails for i in range(len(tail))]),
            [SequenceChunk(cache, len(tail), prompt=True) for cache, tail in zip(caches, tails, strict=True)],
            torch.arange(sum(map(len, tails))),
        )
        if caches is shared:
            got = tiny_model.forward(batch)
        else:
            torch.testing.assert_close(got, tiny_model.forward(batch), atol=1e-5, rtol=0)
    for step in range(3):
        tokens = [9 + step, 20 + step, 31 + step, 42 + step]
        got = decode_batch(tiny_model, [shared[0], stranger, shared[1], shared[2]], tokens)
        want = decode_batch(tiny_model, [copied[0], reference_stranger, copied[1], copied[2]], tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for own, private in zip(shared, copied, strict=True):  # the whole KV, read through slice, is the copy's
        torch.testing.assert_close(own.slice(0).keys, private.slice(0).keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(own.slice(30, 43).values, private.slice(30, 43).values, atol=1e-5, rtol=0)


def test_a_shared_sequence_that_outgrows_its_slot_copies_the_prefix_first(tiny_model) -> None:
    context = list(range(10, 42))
    tree = _tree_with_two_pieces(tiny_model, context)
    slots = make_slots(tiny_model, num_slots=1, capacity=34)
    own, private = slots.acquire(), tiny_model.new_cache()
    match = tree.match([*context, 5], max_tokens=32)
    own.share(tree.share(match))
    tree.load(match, private)
    for step in range(4):  # the third token no longer fits the slot
        tokens = [50 + step]
        torch.testing.assert_close(
            decode_batch(tiny_model, [own], tokens), decode_batch(tiny_model, [private], tokens), atol=1e-5, rtol=0
        )
    assert own.slots is None and own.shared is None
    torch.testing.assert_close(own.keys[:, :, :36], private.keys[:, :, :36], atol=1e-6, rtol=0)


def test_share_is_a_view_and_an_insert_never_reads_the_unwritten_prefix(tiny_model) -> None:
    context = list(range(10, 42))
    tree = _tree_with_two_pieces(tiny_model, context)
    match = tree.match(context)
    prefix = tree.share(match)
    nodes = match.nodes[-1].path()
    assert [k.data_ptr() for k in prefix.keys] == [n.keys.data_ptr() for n in nodes]  # the tree's memory
    slots = make_slots(tiny_model, num_slots=1, capacity=64)
    own = slots.acquire()
    own.share(prefix)
    prefill(tiny_model, own, list(range(60, 76)))
    tree.clear()  # the tree no longer holds the prefix: storing the sequence would need slots [0, 32)
    assert tree.insert(context + list(range(60, 76)), own, readable_from=32) == 0 and tree.nbytes == 0
    tree.release(match)


# -- the engine on the real model ---------------------------------------------------------------------------

CONTEXT = (
    "Meeting notes, infrastructure review. The team moved the nightly batch jobs from the old cluster to the "
    "new one in March. Two incidents followed: a disk filled up on the storage node because log rotation was "
    "not configured, and a scheduler bug ran the billing export twice on the last day of the month. Both were "
    "fixed within a day. The database migration is planned for next quarter; it needs a maintenance window of "
    "four hours and a rollback plan that the team has not written yet. Costs went down by twelve percent after "
    "the move, mostly from turning off idle machines at night. The on-call rotation now has six people. "
)
QUESTIONS = ["What went wrong?", "What is planned next?", "Did costs change?", "Who is on call?"]


def _engine(model, tokenizer, shared_from: int | None, **config) -> Engine:
    return Engine(
        model,
        tokenizer,
        EngineConfig(
            scheduler=SchedulerConfig(max_running=8, max_batch_tokens=64),
            speculation=config.pop("speculation", None),
            shared_prefix_min_tokens=shared_from,
            **config,
        ),
    )


def _fan_out(engine: Engine, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
    engine.generate([prompts[0][: len(prompts[0]) - 8]], SamplingParams(max_tokens=1))  # the context, cached
    return engine.generate(prompts, sampling, role="agent")


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    context = tokenizer.encode(CONTEXT * 2)
    return [context + tokenizer.encode(f"\nQuestion: {q}\nAnswer:") for q in QUESTIONS]


@pytest.mark.slow
def test_agents_over_one_context_get_the_tokens_copies_get_and_hold_it_once(model, tokenizer, prompts) -> None:
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    copied = [c.token_ids for c in _fan_out(_engine(model, tokenizer, None), prompts, sampling)]
    engine = _engine(model, tokenizer, 64)
    engine.generate([prompts[0][:-8]], SamplingParams(max_tokens=1))
    start = len(prompts[0]) - 8 - 64
    engine.kv_slots.keys[:, :, :, :start].zero_()  # (what that request left in its slot)
    ids = [engine.add_request(p, sampling) for p in prompts]
    events = engine.step()  # admitted: each reads the cached context in place
    running = engine.scheduler.running
    hit = running[0].stats.prefix_hit_tokens
    assert hit >= 64 and all(s.cache.shared is not None and s.cache.shared.length == hit for s in running)
    per_token = 2 * running[0].cache.keys[:, :, 0].numel() * 4
    own = sum(s.cache.length - hit for s in running)
    assert engine.held_kv_bytes() == (hit + own) * per_token  # the context once
    assert all(s.cache.keys[:, :, :start].abs().sum() == 0 for s in running)  # and never copied
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while events:
        tokens[events[0].request_id] += [] if events[0].token_id is None else [events[0].token_id]
        events = events[1:] or (engine.step() if engine.has_work() else [])
    assert [tokens[i] for i in ids] == copied
    # a finished agent's KV went into the prefix cache beyond the context: its whole prompt is a hit now
    probe = engine.prefix_cache.match(prompts[1] + [0] * 16)
    assert probe.num_tokens == len(prompts[1]) // 16 * 16
    engine.prefix_cache.release(probe)


@pytest.mark.slow
def test_a_lone_reader_copies_and_a_later_partner_shares(model, tokenizer, prompts) -> None:
    engine = _engine(model, tokenizer, 64)
    engine.generate([prompts[0][:-8]], SamplingParams(max_tokens=1))
    engine.add_request(prompts[0], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    (lone,) = engine.scheduler.running
    assert lone.stats.prefix_hit_tokens >= 64 and lone.cache.shared is None  # alone, two parts would only cost
    engine.add_request(prompts[1], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request(prompts[2], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    first, second = engine.scheduler.running[1:]
    assert first.cache.shared is not None and first.cache.shared.identity == second.cache.shared.identity


@pytest.mark.slow
def test_hooks_and_speculation_see_the_whole_kv(model, tokenizer, prompts) -> None:
    seen: dict[int | None, list[torch.Tensor]] = {None: [], 64: []}
    for shared_from in (None, 64):
        engine = _engine(model, tokenizer, shared_from)
        engine.generate([prompts[0][:-8]], SamplingParams(max_tokens=1))
        hooked = PromptReuse(on_prefilled=lambda cache, into=seen[shared_from]: into.append(cache.slice(0).keys))
        engine.add_request(prompts[2], SamplingParams(max_tokens=2), reuse=hooked)
        engine.add_request(prompts[3], SamplingParams(max_tokens=2))  # a second reader: the hit is shared
        engine.step()
        assert all((s.cache.shared is not None) == (shared_from is not None) for s in engine.scheduler.running)
        while engine.has_work():
            engine.step()
    assert len(seen[64]) == 1
    assert torch.equal(seen[64][0][:, :, :256], seen[None][0][:, :, :256])  # the shared part is the tree's KV
    torch.testing.assert_close(seen[64][0], seen[None][0], atol=1e-4, rtol=0)  # the rest: float rounding
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = _fan_out(_engine(model, tokenizer, 64), prompts, sampling)
    drafted = _fan_out(_engine(model, tokenizer, 64, speculation=SpeculationConfig()), prompts, sampling)
    assert sum(c.stats.verify_steps for c in drafted) > 0  # drafts were verified over the shared prefix
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]


@pytest.mark.slow
def test_agents_arriving_together_over_a_new_context_compute_it_once(model, tokenizer, prompts) -> None:
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    copied = _engine(model, tokenizer, None).generate(prompts, sampling)  # today's: each prefills it all
    engine = _engine(model, tokenizer, 64)
    shared = engine.generate(prompts, sampling)
    assert [c.token_ids for c in shared] == [c.token_ids for c in copied]
    hits = [c.stats.prefix_hit_tokens for c in shared]
    context = len(tokenizer.encode(CONTEXT * 2))
    assert hits[0] == 0 and all(hit >= context - 16 for hit in hits[1:])  # the first computed it for all
    computed = [
        sum(len(p) - c.stats.prefix_hit_tokens for p, c in zip(prompts, run, strict=True)) for run in (copied, shared)
    ]
    assert computed[0] - computed[1] >= 2 * (context - 16)  # without waiting, most of them computed it again
    assert engine.scheduler.running == [] and not engine._awaited


def test_a_request_not_ready_keeps_its_place_and_lets_others_pass() -> None:
    from kvmesh.workers.scheduler import Scheduler
    from kvmesh.workers.sequence import Sequence

    scheduler = Scheduler(SchedulerConfig(max_running=4, max_batch_tokens=64))
    seqs = [
        Sequence(f"r{i}", [1, 2, 3], SamplingParams(), cache=None, text=None, generator=None, max_tokens=4)  # type: ignore[arg-type]
        for i in range(4)
    ]
    for seq in seqs:
        scheduler.add(seq)
    chunks = scheduler.schedule(lambda seq: True, lambda seq: seq.request_id not in ("r0", "r2"))
    assert [c.seq.request_id for c in chunks] == ["r1", "r3"]
    assert [seq.request_id for seq in scheduler.waiting] == ["r0", "r2"]


def test_requests_brought_forward_bring_no_one_and_pass_a_waiting_request_once() -> None:
    """a0 admitted brings a1 and a2 (its prefix's readers) ahead of x; a1 and a2, admitted out of turn, bring
    nobody: a3, arriving later, goes after x."""
    from kvmesh.workers.scheduler import Scheduler
    from kvmesh.workers.sequence import Sequence

    def request(name: str) -> Sequence:
        return Sequence(name, [1, 2, 3], SamplingParams(), cache=None, text=None, generator=None, max_tokens=4)  # type: ignore[arg-type]

    scheduler = Scheduler(SchedulerConfig(max_running=2, max_batch_tokens=64))
    for name in ("a0", "x", "a1", "a2"):
        scheduler.add(request(name))

    def partner(seq: Sequence, other: Sequence) -> bool:
        return seq.request_id[0] == other.request_id[0] == "a"

    def admitted() -> list[str]:
        before = list(scheduler.running)
        scheduler.schedule(lambda seq: True, partner=partner)
        return [seq.request_id for seq in scheduler.running if seq not in before]

    assert admitted() == ["a0", "a1"] and [seq.request_id for seq in scheduler.waiting] == ["a2", "x"]
    scheduler.add(request("a3"))
    order = []
    while scheduler.waiting:
        scheduler.remove(scheduler.running[0])
        order += admitted()
    assert order == ["a2", "x", "a3"]


# -- readers in the step graph (workers/step_graph.py) --------------------------------------------------------


@pytest.mark.parametrize("fmt,tolerance", [("int4", 5e-3), ("fp32", 1e-4)])
def test_prefix_readers_decode_in_the_step_graph_as_copies_decode_alone(raw_model, fmt: str, tolerance: float) -> None:
    """Three readers of two shared prefixes beside a plain decode in one slot buffer: the decode's step call takes
    the first prefix's readers (its KV bound as the tree holds it, no copy), the other prefix (two tree nodes,
    joined once) gets a call of its own. Three steps: logits and every cache as each sequence's own copy of its
    prefix decoding alone off the step (torch eager, or in int4 the layer graphs)."""
    config = dataclasses.replace(raw_model.config, num_layers=2)
    graphed = LlamaModel(config, raw_model.weights, weight_format=fmt)  # type: ignore[arg-type]
    assert graphed.step is not None
    ids = raw_model.tokenizer.encode(SAMPLE_TEXT)
    first, second = ids[:32], ids[40:72]
    tree = PrefixCache(PrefixCacheConfig(block_size=16))
    for context in (first, second, second[:16] + ids[100:116]):  # the last splits `second` into two nodes
        cache = graphed.new_cache()
        prefill(graphed, cache, context)
        tree.insert(context, cache)
    slots = make_slots(graphed, num_slots=5, capacity=64)
    layout = [(first, ids[80:81]), (None, ids[82:93]), (second, ids[94:97]), (first, ids[98:103])]  # per slot
    together, alone, matches = [], [], []
    for prefix, tail in layout:
        own, private = slots.acquire(), graphed.new_cache()
        if prefix is not None:
            match = tree.match(prefix + tail, max_tokens=len(prefix))
            own.share(tree.share(match))
            tree.load(match, private)
            matches.append(match)
        for cache in (own, private):
            prefill(graphed, cache, tail)
        together.append(own)
        alone.append(private)
    chunks = [SequenceChunk(cache, 1) for cache in together]
    calls, rest = graphed.step.plan(chunks)
    assert rest == [] and [(call.chunks, call.readers and call.readers.chunks) for call in calls] == [
        ([1], [0, 3]),
        ([], [2]),
    ]
    node_keys = matches[0].nodes[-1].keys
    assert calls[0].readers.prefix_keys.data_ptr() == node_keys.data_ptr()  # type: ignore[union-attr]
    assert calls[1].readers.prefix_length == 32 and len(matches[1].nodes) == 2  # type: ignore[union-attr]
    for step in range(3):
        tokens = [9 + step, 20 + step, 31 + step, 42 + step]
        got = decode_batch(graphed, together, tokens)
        graphed.step, step_graph = None, graphed.step
        try:
            pairs = zip(alone, tokens, strict=True)
            want = torch.cat([decode_batch(graphed, [cache], [token]) for cache, token in pairs])
        finally:
            graphed.step = step_graph
        assert (got - want).norm() / want.norm() < tolerance
    for own, private in zip(together, alone, strict=True):
        assert own.length == private.length
        for mine, theirs in ((own.slice(0).keys, private.keys), (own.slice(0).values, private.values)):
            held = theirs[:, :, : private.length]
            assert (mine - held).norm() / held.norm() < tolerance


OTHER_CONTEXT = (
    "Field report from the orchard. The spring frost came two weeks late and took most of the early apple "
    "blossoms on the north slope; the pears on the south side were spared. The new irrigation lines were laid "
    "in April and cut the water bill by a fifth. Two pickers left in June and were replaced by students for "
    "the summer. The cider press needs a new motor before the harvest, and the buyer from the city wants a "
    "firm price for three hundred crates by the end of August. "
)


def test_an_admitted_reader_brings_the_readers_of_its_prefix_ahead_of_another_prefixs(model, tokenizer) -> None:
    """Three slots, six agents arriving alternately over two cached contexts: the first one admitted brings
    the two other readers of its context forward, so one step decodes three readers of one prefix (one step
    call) instead of two groups; the other context's agents follow, and all of them finish."""
    contexts = [tokenizer.encode(text * 2) for text in (CONTEXT, OTHER_CONTEXT)]
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(scheduler=SchedulerConfig(max_running=3, max_batch_tokens=64), shared_prefix_min_tokens=64),
    )
    engine.generate(contexts, SamplingParams(max_tokens=1))  # both contexts cached
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    ids = [
        engine.add_request(
            contexts[i % 2] + tokenizer.encode(f"\nQuestion {i}: {QUESTIONS[i // 2]}\nAnswer:"), sampling
        )
        for i in range(6)
    ]
    engine.step()
    running = engine.scheduler.running
    assert [s.request_id for s in running] == [ids[0], ids[2], ids[4]]
    assert all(
        s.cache.shared is not None and s.cache.shared.identity == running[0].cache.shared.identity for s in running
    )
    finished = set()
    while engine.has_work():
        finished |= {event.request_id for event in engine.step() if event.finished}
    assert finished == set(ids)
