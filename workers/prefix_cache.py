"""Exact prefix cache shared across requests: a radix tree over token blocks (ARCHITECTURE.md, "KV memory").

Each node owns a run of whole blocks and its own copy of their KV. A token's KV depends only on the
tokens before it, and a prefix sits at the same positions in every prompt, so loading a cached prefix
needs no re-rotation and is exact by construction.

Pins: `match` pins its path (refcount += 1 on every node up to the root) until `release`; pinned nodes
are never evicted. Budget: after every `insert`, `nbytes <= budget_bytes`. Pinned nodes were inside the
budget when they were pinned, and what an insert adds is unpinned, so evicting least-recently-used
unpinned leaves (the new one is the most recent) always gets back under it; when pins hold the whole
budget the new tokens are simply not kept. Nothing a live match needs is ever dropped.

Not thread-safe, and needs no locks: the engine calls it from one thread.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .shared_prefix import SharedPrefix


@dataclass(frozen=True)
class PrefixCacheConfig:
    block_size: int = 16  # tokens per block; only whole blocks are cached
    budget_bytes: int = 512 << 20  # most bytes of KV (keys + values) the tree holds

    def __post_init__(self) -> None:
        for name in ("block_size", "budget_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PrefixCacheConfig.{name} must be a positive int, got {value!r}")


class PrefixNode:
    """A run of whole blocks and their KV; the root has no tokens and no tensors."""

    __slots__ = ("children", "keys", "last_access", "parent", "refcount", "tokens", "values")

    def __init__(
        self,
        tokens: tuple[int, ...],
        keys: torch.Tensor | None,
        values: torch.Tensor | None,
        parent: PrefixNode | None,
    ) -> None:
        self.tokens = tokens
        self.keys = keys  # [L, H, len(tokens), D], contiguous, owned by the tree
        self.values = values  # [L, H, len(tokens), D]
        self.parent = parent
        self.children: dict[tuple[int, ...], PrefixNode] = {}  # keyed by the child's first block
        self.refcount = 0
        self.last_access = 0

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def path(self) -> list[PrefixNode]:
        """Root's child first, down to self."""
        nodes: list[PrefixNode] = []
        node: PrefixNode | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class PrefixMatch:
    """What `match` found. Pinned until `release`.

    `nodes` is the path as it was at match time; `load`/`release` follow parent links up from its last
    node instead, because a later insert may split a pinned node and so put a new node into the path.
    """

    num_tokens: int  # prompt tokens whose KV the match provides (a multiple of block_size)
    nodes: list[PrefixNode] = field(default_factory=list)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    # A slice along the token dim may still alias the caller's buffer; the tree needs its own copy.
    return tensor.clone(memory_format=torch.contiguous_format)


class PrefixCache:
    def __init__(self, config: PrefixCacheConfig) -> None:
        self.config = config
        self._root = PrefixNode((), None, None, None)
        self._clock = 0  # logical LRU time: deterministic, no ties within one call
        self._nbytes = 0
        self._num_nodes = 0
        self.hits_tokens = 0  # total tokens served by match
        self.queries = 0  # match calls
        self.evicted_bytes = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    def _common_blocks(self, run: tuple[int, ...], token_ids: Sequence[int], start: int, end: int) -> int:
        """Tokens (a block multiple) that `run` shares with token_ids[start:end], compared block by block."""
        bs, n = self.config.block_size, 0
        while n < len(run) and start + n + bs <= end:
            if tuple(token_ids[start + n : start + n + bs]) != run[n : n + bs]:
                break
            n += bs
        return n

    def match(self, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached whole-block prefix of token_ids, capped at max_tokens (floored to a block)."""
        self.queries += 1
        pos, nodes = self._walk(token_ids, max_tokens)
        self._clock += 1
        now = self._clock
        for n in nodes:
            n.refcount += 1
            n.last_access = now
        self.hits_tokens += pos
        return PrefixMatch(num_tokens=pos, nodes=nodes)

    def cached_tokens(self, token_ids: Sequence[int], max_tokens: int | None = None) -> int:
        """What `match` would serve now, without pinning or counting anything."""
        return self._walk(token_ids, max_tokens)[0]

    def _walk(self, token_ids: Sequence[int], max_tokens: int | None) -> tuple[int, list[PrefixNode]]:
        bs = self.config.block_size
        limit = len(token_ids) if max_tokens is None else min(len(token_ids), max(max_tokens, 0))
        limit -= limit % bs
        nodes: list[PrefixNode] = []
        node, pos = self._root, 0
        while pos < limit:
            child = node.children.get(tuple(token_ids[pos : pos + bs]))
            if child is None:
                break
            shared = self._common_blocks(child.tokens, token_ids, pos, limit)
            nodes.append(child)
            pos += shared
            if shared < len(child.tokens):
                break  # ends inside this node: it stays whole, load reads only its first blocks
            node = child
        return pos, nodes

    def load(self, match: PrefixMatch, cache: KVCache) -> None:
        """Append the matched KV (match.num_tokens tokens, in order) after cache.length: a copy of `share`."""
        if match.num_tokens == 0:
            return
        prefix = self.share(match)
        if (cache.dtype, cache.keys[:, :, 0].shape) != (prefix.keys[0].dtype, prefix.keys[0][:, :, 0].shape):
            raise ValueError(f"cache layout {tuple(cache.keys.shape)} {cache.dtype} does not match the tree's")
        cache.reserve(match.num_tokens)
        start = cache.length
        prefix.copy_to(cache.keys[:, :, start:], cache.values[:, :, start:], 0, match.num_tokens)
        cache.length = start + match.num_tokens

    def share(self, match: PrefixMatch) -> SharedPrefix:
        """The matched KV in place: views of the nodes' tensors, no copy (shared_prefix.py). The views keep the
        tensors alive even if a later split replaces a node's own; the pin keeps the nodes in the tree."""
        if match.num_tokens == 0:
            raise ValueError("an empty match has no KV to share")
        if not match.nodes:
            raise ValueError("this match was released; its KV is no longer pinned")
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        left = match.num_tokens
        for node in match.nodes[-1].path():
            if left == 0:
                break
            take = min(len(node.tokens), left)
            assert node.keys is not None and node.values is not None
            keys.append(node.keys[:, :, :take])
            values.append(node.values[:, :, :take])
            left -= take
        return SharedPrefix(tuple(keys), tuple(values))

    def release(self, match: PrefixMatch) -> None:
        """Unpin the match's path. A second release of the same match does nothing."""
        if not match.nodes:
            return
        for node in match.nodes[-1].path():
            if node.refcount <= 0:
                raise RuntimeError("prefix cache refcount would go negative")
            node.refcount -= 1
        match.nodes = []

    def _split(self, node: PrefixNode, at: int) -> PrefixNode:
        """Cut `node` after `at` tokens; returns the new head. `node` keeps the tail (and its identity, so
        matches whose last node it is still reach the full path); the head inherits its pins and LRU time.
        """
        parent = node.parent
        assert parent is not None and node.keys is not None and node.values is not None
        head = PrefixNode(node.tokens[:at], _own(node.keys[:, :, :at]), _own(node.values[:, :, :at]), parent)
        head.refcount, head.last_access = node.refcount, node.last_access
        parent.children[node.tokens[: self.config.block_size]] = head
        node.tokens = node.tokens[at:]
        node.keys, node.values = _own(node.keys[:, :, at:]), _own(node.values[:, :, at:])
        node.parent = head
        head.children[node.tokens[: self.config.block_size]] = node
        self._num_nodes += 1
        return head

    def insert(self, token_ids: Sequence[int], cache: KVCache, readable_from: int = 0) -> int:
        """Store the whole blocks of token_ids not yet cached; cache slots [readable_from, len(token_ids)) hold
        their KV (a cache reading a shared prefix in place holds nothing before it: if the tree no longer holds
        that prefix, nothing is stored).

        Returns the tokens this call added that are still in the tree after it evicted to fit the budget.
        """
        bs = self.config.block_size
        total = len(token_ids) - len(token_ids) % bs
        if total > cache.length:
            raise ValueError(f"{total} tokens to cache but the KV cache holds only {cache.length}")
        self._clock += 1
        now = self._clock
        node, pos = self._root, 0
        while pos < total:
            child = node.children.get(tuple(token_ids[pos : pos + bs]))
            if child is None:
                break
            shared = self._common_blocks(child.tokens, token_ids, pos, total)
            if shared < len(child.tokens):
                child = self._split(child, shared)
            child.last_access = now
            node, pos = child, pos + shared
        if pos < min(readable_from, total):
            return 0
        per_token = 2 * cache.keys[:, :, 0].numel() * cache.keys.element_size()
        end = min(total, pos + (self.config.budget_bytes // per_token) // bs * bs)  # never more than fits
        leaf = None
        if end > pos:
            keys, values = _own(cache.keys[:, :, pos:end]), _own(cache.values[:, :, pos:end])  # [L, H, t, D]
            leaf = PrefixNode(tuple(token_ids[pos:end]), keys, values, node)
            leaf.last_access = now
            node.children[leaf.tokens[:bs]] = leaf
            self._nbytes += leaf.nbytes
            self._num_nodes += 1
        if self._nbytes > self.config.budget_bytes:
            self.evict(self._nbytes - self.config.budget_bytes)
        if leaf is None or node.children.get(leaf.tokens[:bs]) is not leaf:
            return 0
        return len(leaf.tokens)

    def evict(self, bytes_needed: int) -> int:
        """Free least-recently-used unpinned leaves (a freed leaf's parent may follow); returns bytes freed."""
        if bytes_needed <= 0:
            return 0
        heap: list[tuple[int, int, PrefixNode]] = []
        stack, order = [self._root], 0
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self._root and not node.children and node.refcount == 0:
                heap.append((node.last_access, order, node))
                order += 1
        heapq.heapify(heap)
        freed = 0
        while freed < bytes_needed and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.tokens[: self.config.block_size]]
            freed += leaf.nbytes
            self._num_nodes -= 1
            if parent is not self._root and not parent.children and parent.refcount == 0:
                heapq.heappush(heap, (parent.last_access, order, parent))
                order += 1
        self._nbytes -= freed
        self.evicted_bytes += freed
        return freed

    def clear(self) -> None:
        """Drop every node. Outstanding matches keep their detached nodes, so they still load and release."""
        self._root = PrefixNode((), None, None, None)
        self._nbytes = 0
        self._num_nodes = 0
