"""The suffix tree against brute-force substring counts; the suffix cache's drafts and its memory bound."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.workers.suffix_cache import SuffixCache, SuffixCacheConfig
from kvmesh.workers.suffix_tree import SuffixTree


def occurrences(seqs: dict[int, list[int]], pattern: list[int]) -> int:
    n = len(pattern)
    return sum(1 for s in seqs.values() for i in range(len(s) - n + 1) if s[i : i + n] == pattern)


# A run of operations on a few sequences over a tiny vocabulary (so patterns repeat a lot):
# ("extend", seq, tokens) appends to a live sequence, ("close", seq), ("remove", seq).
operation = st.one_of(
    st.tuples(st.just("extend"), st.integers(0, 4), st.lists(st.integers(0, 3), max_size=9)),
    st.tuples(st.just("close"), st.integers(0, 4)),
    st.tuples(st.just("remove"), st.integers(0, 4)),
)


@settings(max_examples=300, deadline=None)
@given(depth=st.integers(1, 6), ops=st.lists(operation, max_size=14))
def test_counts_equal_brute_force_substring_counts(depth, ops):
    tree, reference, closed = SuffixTree(depth), {}, set()
    for op in ops:
        kind, seq = op[0], op[1]
        if kind == "extend" and seq not in closed:
            tree.extend(seq, op[2])
            reference.setdefault(seq, []).extend(op[2])
        elif kind == "close" and seq in reference:
            tree.close(seq)
            closed.add(seq)
        elif kind == "remove" and seq in reference:
            tree.remove(seq)
            del reference[seq]
            closed.discard(seq)  # the id may start a new sequence
        tree.check()
        total = sum(len(s) for s in reference.values())
        assert tree.count([]) == total
        assert tree.num_nodes <= 2 * total + 1  # path compression: O(tokens) nodes at any depth
        for n in range(1, depth + 1):
            for pattern in itertools.product(range(4), repeat=n):
                assert tree.count(list(pattern)) == occurrences(reference, list(pattern)), pattern


def test_nodes_stay_linear_in_tokens_whatever_the_depth_and_repetition():
    rng = random.Random(0)
    text = [rng.randrange(50) for _ in range(3000)]
    for depth in (8, 64):
        tree = SuffixTree(depth)
        tree.extend(0, text)
        tree.extend(1, text)  # a verbatim repeat adds windows, not nodes
        tree.extend(2, text[:1000] + [rng.randrange(50) for _ in range(1000)])
        tree.check()
        assert tree.num_nodes <= 2 * tree.count([]) + 1
        for seq in (0, 1, 2):
            tree.remove(seq)
            tree.check()
        assert tree.num_nodes == 1 and tree.count([]) == 0 and not tree.seqs


def test_a_draft_follows_the_most_frequent_continuation_with_count_ratios():
    config = SuffixCacheConfig(max_depth=16, spec_factor=4, tree_drafts=False, global_tokens=0)
    cache = SuffixCache(config)
    prompt = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 9, 1, 2, 3, 4, 5, 9]
    cache.start("r", prompt[:-4])
    cache.extend("r", prompt[-4:])  # output before the first draft joins the prompt in the request's tree
    assert "r" not in cache.local and cache.running("r")  # built at the first draft, off the first token's path
    draft = cache.draft("r", [0, 1, 2], max_tokens=8)
    # "1 2" occurs 3 times: "3 4" follows with certainty, then 5 (2 of 3 times), then 9
    assert draft.tokens[:4] == [3, 4, 5, 9] and draft.parents[:4] == [-1, 0, 1, 2]
    assert draft.probs[:4] == [1.0, 1.0, 2 / 3, 2 / 3]
    assert draft.match_len == 2 and draft.source == "local"  # equal scores: the longer match wins
    assert draft.score == sum(draft.probs)
    # a longer match is more specific: after "6 9 1 2" only "3 4 5 9" ever followed, with certainty
    assert cache.draft("r", [6, 9, 1, 2], max_tokens=4).probs == [1.0] * 4


def test_tree_drafts_keep_likely_siblings_and_drop_rare_ones():
    config = SuffixCacheConfig(max_depth=16, spec_factor=6, tree_drafts=True, min_token_prob=0.3, global_tokens=0)
    cache = SuffixCache(config)
    prompt = [7, 1, 8, 7, 1, 8, 7, 1, 9, 7, 1, 8, 7, 2, 0]
    cache.start("r", prompt)
    draft = cache.draft("r", [5, 7], max_tokens=6)
    # after 7: 1 (4 of 5) then 8 (3 of 4) or 9 (1 of 4, probability 0.2 < 0.3: dropped); 2 (1 of 5) dropped
    assert draft.tokens[0] == 1 and 2 not in draft.tokens and 9 not in draft.tokens
    assert 8 in draft.tokens
    for i, parent in enumerate(draft.parents):
        assert parent < i  # best-first: parents come first, so any prefix is a tree
        if parent >= 0:
            assert draft.probs[i] <= draft.probs[parent]


def test_global_trees_share_outputs_by_role_and_across_roles():
    cache = SuffixCache(SuffixCacheConfig(max_depth=16, spec_factor=1, global_tokens=1000))
    skeleton = [50, 51, 52, 53, 54, 55, 56, 57]
    cache.start("a", [1, 2, 3], role="sql")
    cache.extend("a", [40, 41, *skeleton])
    cache.stop("a")
    cache.start("b", [4, 5, 6], role="sql")
    draft = cache.draft("b", [4, 5, 6, 50, 51, 52], max_tokens=4)
    assert draft.tokens == [53, 54, 55] and draft.source == "role"  # alpha * 3 matched tokens
    cache.start("c", [4, 5, 6], role="json")  # another role still finds it in the cross-role tree
    assert cache.draft("c", [9, 50, 51, 52], max_tokens=3).source == "global"


def test_global_trees_evict_oldest_outputs_under_the_token_budget():
    budget = 200
    cache = SuffixCache(SuffixCacheConfig(max_depth=8, global_tokens=budget))
    rng = random.Random(1)
    for i in range(40):
        request = f"r{i}"
        cache.start(request, [rng.randrange(30) for _ in range(20)], role=("a", "b")[i % 2])
        cache.extend(request, [rng.randrange(30) for _ in range(rng.randint(1, 60))])
        assert cache.global_tokens <= budget + 60  # a running request's output is never evicted
        cache.stop(request)
        assert cache.global_tokens <= budget
        stored = sum(len(s) for s in cache.all.seqs.values())
        assert stored == cache.global_tokens == sum(t.num_tokens() for t in cache.roles.values())
        assert cache.all.num_nodes <= 2 * stored + 1
        assert not cache.local  # request trees go when requests end
    cache.clear_global()
    assert cache.global_tokens == 0 and cache.all.num_nodes == 1 and not cache.roles
