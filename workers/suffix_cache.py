"""SuffixDecoding's drafts: suffix trees over what was already written, and the most likely continuation.

Trees (all depth-limited suffix tries, see suffix_tree.py; only verified tokens ever go in):
- one per running request over its prompt and its output so far (the self-refine case: a revision copies
  spans of the draft that sits in its prompt); dropped when the request ends;
- one per agent role over the outputs of that role's requests (a pipeline stage repeating its skeleton);
- one across roles over all outputs.
Outputs enter the global trees while they are generated (a concurrent request of the same role can use
them at once) and leave in FIFO order once more than `global_tokens` output tokens are held; a running
request's output is never evicted, so the bound is global_tokens plus the running outputs.

Drafting (after ArcticInference's `speculate`, see ../shared/reference/suffixdecoding.md §1.4-1.5): match
suffixes of the context of growing length m (absent at m means absent beyond, so it stops there), grow
from each match the most likely continuation best-first, as a chain or a small tree, at most
min(max_spec_tokens, alpha * m + offset) tokens, never a token whose path probability (a product of
child.count / node.count) is under min_token_prob; keep the draft with the highest expected number of
accepted tokens (sum of path probabilities). Ties go to the longer match and to the request's own tree.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .suffix_tree import SuffixTree, _Node


@dataclass(frozen=True)
class SuffixCacheConfig:
    # Defaults chosen by replaying the shipped workloads' greedy traces (bench/NOTES.md): alpha 2 drafts
    # more from short matches (JSON keys) at ~4% of a step per extra row; depth 64 gained nothing over 32
    # at 1.4x the update cost.
    max_depth: int = 32  # tree depth; a match of m tokens leaves room for max_depth - m draft tokens
    max_spec_tokens: int = 16
    spec_factor: float = 2.0  # alpha: draft at most alpha * match length (+ offset) tokens
    spec_offset: float = 0.0
    min_token_prob: float = 0.1
    tree_drafts: bool = True  # False: chains only
    global_tokens: int = 65536  # output tokens kept in the global trees; 0 disables them

    def __post_init__(self) -> None:
        if self.max_depth < 2 or self.max_spec_tokens < 1:
            raise ValueError("max_depth must be >= 2 and max_spec_tokens >= 1")
        if self.spec_factor <= 0 or not 0 <= self.min_token_prob <= 1 or self.global_tokens < 0:
            raise ValueError("spec_factor must be > 0, min_token_prob in [0, 1], global_tokens >= 0")


@dataclass
class Draft:
    """A draft tree below the pending token; nodes in best-first order, so parents come first."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index of the parent node; -1 = the pending token
    probs: list[float] = field(default_factory=list)  # empirical probability of the path to each node
    match_len: int = 0
    source: str = ""  # "local", "role" or "global"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def score(self) -> float:
        """Expected accepted tokens if the tree's frequencies were the model's."""
        return sum(self.probs)

    def prefix(self, n: int) -> Draft:
        """The first n nodes (still a tree: parents precede children)."""
        return Draft(self.tokens[:n], self.parents[:n], self.probs[:n], self.match_len, self.source)


def grow(
    tree: SuffixTree, point: tuple[_Node, int], first_total: int, max_tokens: int, min_prob: float, as_tree: bool
) -> Draft:
    """Best-first expansion below a matched point (node, edge tokens consumed).

    first_total: the count to divide the first step's children by (the point's count, less occurrences
    that cannot continue, such as the context's own end).
    """
    order = itertools.count()
    heap: list[tuple[float, int, _Node, int, int]] = []  # (-prob, tiebreak, node, edge offset, parent)

    def push_children(node: _Node, prob: float, total: int, parent: int) -> None:
        for child in tree.children(node):
            p = prob * child.count / total
            if p < min_prob:
                break  # children come by decreasing count
            heapq.heappush(heap, (-p, next(order), child, 0, parent))
            if not as_tree:
                break

    node, used = point
    if used < node.length:  # inside an edge the next token is certain
        heapq.heappush(heap, (-1.0, next(order), node, used, -1))
    elif first_total > 0:
        push_children(node, 1.0, first_total, -1)
    draft = Draft()
    while heap and len(draft) < max_tokens:
        neg, _, node, offset, parent = heapq.heappop(heap)
        index = len(draft)
        draft.tokens.append(tree.token(node, offset))
        draft.parents.append(parent)
        draft.probs.append(-neg)
        if offset + 1 < node.length:
            heapq.heappush(heap, (neg, next(order), node, offset + 1, index))
        else:
            push_children(node, -neg, node.count, index)
    return draft


class SuffixCache:
    def __init__(self, config: SuffixCacheConfig | None = None) -> None:
        self.config = config or SuffixCacheConfig()
        depth = self.config.max_depth
        self.local: dict[str, SuffixTree] = {}  # running request -> its own tree (prompt + output), once built
        # running request -> the tokens its tree will hold: built at its first draft, not at its first token,
        # because a 3K-token prompt takes ~0.2 s of Python to load, which would otherwise delay that token
        self._unbuilt: dict[str, list[int]] = {}
        self.roles: dict[str, SuffixTree] = {}
        self.all = SuffixTree(depth)
        self._requests: dict[str, tuple[int, str | None]] = {}  # running request -> (global seq id, role)
        self._fifo: deque[tuple[int, str | None, int]] = deque()  # finished outputs: (seq id, role, tokens)
        self._ids = itertools.count()
        self.global_tokens = 0  # output tokens now in the global trees

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, request: str, prompt: Sequence[int], role: str | None = None) -> None:
        if self.running(request):
            self.stop(request)
        self._unbuilt[request] = list(prompt)
        self._requests[request] = (next(self._ids), role)

    def running(self, request: str) -> bool:
        return request in self._requests

    def extend(self, request: str, tokens: Sequence[int]) -> None:
        """Verified output tokens of a running request."""
        if request in self._unbuilt:
            self._unbuilt[request].extend(tokens)
        else:
            self.local[request].extend(0, tokens)
        if not self.config.global_tokens:
            return
        seq_id, role = self._requests[request]
        for tree in self._global_trees(role, create=True):
            tree.extend(seq_id, tokens)
        self.global_tokens += len(tokens)
        self._evict()

    def stop(self, request: str) -> None:
        """The request ended: drop its own tree; its output stays in the global trees until evicted."""
        self.local.pop(request, None)
        self._unbuilt.pop(request, None)
        entry = self._requests.pop(request, None)
        if entry is None or not self.config.global_tokens:
            return
        seq_id, role = entry
        length = len(self.all.seqs.get(seq_id, ()))
        for tree in self._global_trees(role):
            tree.close(seq_id)
        if length:
            self._fifo.append((seq_id, role, length))
        self._evict()

    def clear_global(self) -> None:
        """Forget every finished output (running requests keep theirs)."""
        while self._fifo:
            self._evict_one()

    def _global_trees(self, role: str | None, create: bool = False) -> list[SuffixTree]:
        trees = [self.all]
        if role is not None:
            if role not in self.roles and create:
                self.roles[role] = SuffixTree(self.config.max_depth)
            if role in self.roles:
                trees.append(self.roles[role])
        return trees

    def _evict(self) -> None:
        while self._fifo and self.global_tokens > self.config.global_tokens:
            self._evict_one()

    def _evict_one(self) -> None:
        seq_id, role, length = self._fifo.popleft()
        for tree in self._global_trees(role):
            tree.remove(seq_id)
        if role is not None and not self.roles[role].seqs:
            del self.roles[role]
        self.global_tokens -= length

    # -- drafting ----------------------------------------------------------------------------------
    def draft(self, request: str, context: Sequence[int], max_tokens: int) -> Draft:
        """The best draft for what follows `context` (the request's prompt + verified output)."""
        max_tokens = min(max_tokens, self.config.max_spec_tokens)
        best = Draft()
        if max_tokens <= 0 or not self.running(request):
            return best
        if request in self._unbuilt:
            tree = SuffixTree(self.config.max_depth)
            tree.extend(0, self._unbuilt.pop(request))
            self.local[request] = tree
        seq_id, role = self._requests[request]
        sources: list[tuple[str, SuffixTree, int]] = [("local", self.local[request], 0)]
        if self.config.global_tokens:
            if role is not None and role in self.roles:
                sources.append(("role", self.roles[role], seq_id))
            sources.append(("global", self.all, seq_id))
        for name, tree, own in sources:
            draft = self._draft_from(tree, own, context, max_tokens)
            if draft.score > best.score:  # strict: ties keep the earlier source (own tree first)
                draft.source = name
                best = draft
        return best

    def _draft_from(self, tree: SuffixTree, own: int, context: Sequence[int], max_tokens: int) -> Draft:
        c = self.config
        own_seq = tree.seqs.get(own, [])
        best = Draft()
        for m in _match_lengths(min(len(context), tree.max_depth - 1)):
            pattern = context[len(context) - m :]
            point = tree.walk(pattern)
            if point is None:
                break  # a longer suffix cannot occur if this one does not
            limit = min(max_tokens, math.floor(m * c.spec_factor + c.spec_offset + 1e-6))
            if limit <= 0:
                continue
            node, used = point
            total = node.count
            if used == node.length and len(own_seq) >= m and own_seq[len(own_seq) - m :] == list(pattern):
                total -= 1  # the context's own end is an occurrence with nothing after it yet
            draft = grow(tree, point, total, limit, c.min_token_prob, c.tree_drafts)
            if draft.score >= best.score and len(draft):  # >=: ties go to the longer match
                draft.match_len = m
                best = draft
        return best


def _match_lengths(longest: int) -> list[int]:
    """Match lengths to try: every one up to 8, then a geometric ladder (~40% apart) up to `longest`."""
    lengths, m = [], 1
    while m <= longest:
        lengths.append(m)
        m = m + 1 if m < 8 else int(m * 1.4)
    if lengths and lengths[-1] != longest:
        lengths.append(longest)
    return lengths
