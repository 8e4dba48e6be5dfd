"""A depth-limited, path-compressed, count-carrying suffix trie over token sequences (built online).

What it stores: for every start position i of every sequence, the window tokens[i : i + max_depth]
(shorter at a sequence's end). A node's `count` is the number of windows that begin with the node's
path, so `count(pattern)` is the number of occurrences of `pattern` (len <= max_depth) in the stored
sequences, and child.count / node.count is the empirical probability of the next token after it.

Why this shape: a plain trie has O(tokens x depth) nodes (~6M Python objects per 100k tokens at depth
64). Compressing single-child chains into edges that reference the stored tokens, (seq, start, length),
keeps it at O(tokens) nodes whatever the repetition. Appending a token extends each of the sequence's
last `max_depth` windows by one step, which also caps the depth: O(max_depth) per token.

Invariants (checked by `check()` in tests):
- Every window ends exactly at a node (edges are split where one ends), so a point inside an edge
  has the count of the node below it.
- No node other than the root has a single child with an equal count (those are merged).
- A node's path occurs in seqs[node.seq] and ends at node.start + node.length there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence


class _Node:
    __slots__ = ("children", "count", "depth", "ends", "length", "parent", "seq", "start")

    def __init__(self, parent: _Node | None, seq: int, start: int, length: int, depth: int, count: int) -> None:
        self.parent = parent
        self.seq = seq  # the edge's tokens are seqs[seq][start : start + length]
        self.start = start
        self.length = length
        self.depth = depth  # tokens on the path from the root, this edge included
        self.count = count
        self.children: dict[int, _Node] | None = None  # keyed by the child edge's first token
        self.ends: dict[int, int] | None = None  # seq -> end index of a finished window ending here


class SuffixTree:
    def __init__(self, max_depth: int) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.root = _Node(None, -1, 0, 0, 0, 0)
        self.seqs: dict[int, list[int]] = {}
        self._active: dict[int, deque[_Node]] = {}  # live seq -> nodes where its unfinished windows end
        self.num_nodes = 1

    # -- building ----------------------------------------------------------------------------------
    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to a live sequence (a new id starts one)."""
        if seq_id in self.seqs and seq_id not in self._active:
            raise ValueError(f"sequence {seq_id} was closed; it cannot grow")
        seq = self.seqs.setdefault(seq_id, [])
        active = self._active.setdefault(seq_id, deque())
        for token in tokens:
            token = int(token)
            seq.append(token)
            j = len(seq) - 1
            self.root.count += 1
            active.append(self.root)  # the window starting at j
            for _ in range(len(active)):
                node = self._step(active.popleft(), token, seq_id, j)
                if node.depth < self.max_depth:
                    active.append(node)
                else:  # a full-depth window is finished
                    node.ends = node.ends or {}
                    node.ends[seq_id] = j + 1

    def _step(self, node: _Node, token: int, seq_id: int, j: int) -> _Node:
        """Extend one window, which ends at `node`, by the token at index j of seq_id."""
        if node.children is None:
            if node.count == 1 and node is not self.root:
                # only this window reaches this leaf, and its edge ends at j in this sequence: grow it
                node.length += 1
                node.depth += 1
                return node
            node.children = {}
        child = node.children.get(token)
        if child is None:
            child = _Node(node, seq_id, j, 1, node.depth + 1, 1)
            node.children[token] = child
            self.num_nodes += 1
            return child
        if child.length > 1:  # stop this window at the child's first token: split the edge there
            head = _Node(node, child.seq, child.start, 1, node.depth + 1, child.count)
            child.start += 1
            child.length -= 1
            child.parent = head
            head.children = {self.seqs[child.seq][child.start]: child}
            node.children[token] = head
            self.num_nodes += 1
            child = head
        child.count += 1
        if node is not self.root and len(node.children) == 1 and node.count == child.count:
            self._merge_into_child(node, child)  # no window ends at `node` any more
        return child

    def _merge_into_child(self, node: _Node, child: _Node) -> None:
        parent = node.parent
        assert parent is not None and parent.children is not None
        child.start -= node.length  # the child's occurrence extends back over node's edge
        child.length += node.length
        child.parent = parent
        parent.children[self.seqs[child.seq][child.start]] = child
        node.parent = None
        self.num_nodes -= 1

    def close(self, seq_id: int) -> None:
        """No more tokens for this sequence: its unfinished windows end where they are."""
        active = self._active.pop(seq_id, None)
        if active is None:
            return
        end = len(self.seqs[seq_id])
        for node in active:
            if node is not self.root:
                node.ends = node.ends or {}
                node.ends[seq_id] = end

    def remove(self, seq_id: int) -> None:
        """Forget a sequence: uncount its windows, drop what only it held, re-point what referenced it."""
        self.close(seq_id)
        seq = self.seqs[seq_id]
        touched: list[_Node] = []
        for i in range(len(seq)):
            window = min(self.max_depth, len(seq) - i)
            node = self.root
            node.count -= 1
            while node.depth < window:
                assert node.children is not None
                child = node.children[seq[i + node.depth]]
                child.count -= 1
                if child.count == 0:
                    del node.children[seq[i + node.depth]]
                    self._kill(child)
                    break
                touched.append(child)
                node = child
            else:
                if node.ends is not None:
                    node.ends.pop(seq_id, None)
        touched = [n for n in set(touched) if n.count > 0]
        touched.sort(key=lambda n: n.depth, reverse=True)  # children before parents
        for node in touched:
            children = node.children
            if children and len(children) == 1:
                (child,) = children.values()
                if child.count == node.count:
                    self._merge_into_child(node, child)
                    continue
            if not children:
                node.children = None
            if node.seq == seq_id:
                self._repoint(node, seq_id)
        del self.seqs[seq_id]

    def _kill(self, node: _Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            n.count = 0
            n.parent = None
            self.num_nodes -= 1
            if n.children:
                stack.extend(n.children.values())

    def _repoint(self, node: _Node, gone: int) -> None:
        """Point a surviving node at another occurrence of its path (one that is not in `gone`)."""
        for child in (node.children or {}).values():
            if child.seq != gone:  # deeper nodes were already re-pointed
                node.seq, node.start = child.seq, child.start - node.length
                return
        for seq_id, end in (node.ends or {}).items():
            node.seq, node.start = seq_id, end - node.length
            return
        for seq_id, active in self._active.items():  # a live window ends here
            if any(n is node for n in active):
                node.seq, node.start = seq_id, len(self.seqs[seq_id]) - node.length
                return
        raise AssertionError("a node with a positive count has no occurrence left")

    # -- queries -----------------------------------------------------------------------------------
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs.values())

    def token(self, node: _Node, offset: int) -> int:
        """The token at `offset` along node's edge."""
        return self.seqs[node.seq][node.start + offset]

    def walk(self, pattern: Sequence[int]) -> tuple[_Node, int] | None:
        """Where `pattern` ends: (node, tokens of node's edge consumed), or None if it never occurs."""
        node, used = self.root, 0
        for token in pattern:
            if used < node.length:
                if self.seqs[node.seq][node.start + used] != token:
                    return None
                used += 1
                continue
            child = node.children.get(token) if node.children else None
            if child is None:
                return None
            node, used = child, 1
        return node, used

    def count(self, pattern: Sequence[int]) -> int:
        """Occurrences of pattern (len <= max_depth) in the stored sequences; len 0 counts positions."""
        found = self.walk(pattern)
        return 0 if found is None else found[0].count

    def children(self, node: _Node) -> list[_Node]:
        """Children by decreasing count, ties by smaller first token (reproducible)."""
        if not node.children:
            return []
        return [c for _, c in sorted(node.children.items(), key=lambda kv: (-kv[1].count, kv[0]))]

    def nodes(self) -> Iterator[_Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children.values())

    def check(self) -> None:
        """Assert the invariants (tests)."""
        seen = 0
        for node in self.nodes():
            seen += 1
            kids = list(node.children.values()) if node.children else []
            assert sum(c.count for c in kids) <= node.count
            if node is not self.root:
                assert node.length >= 1 and node.depth <= self.max_depth
                assert not (len(kids) == 1 and kids[0].count == node.count), "unmerged chain"
                end = node.start + node.length
                path = self.seqs[node.seq][end - node.depth : end]
                assert len(path) == node.depth and end - node.depth >= 0
            for key, child in (node.children or {}).items():
                assert child.parent is node and child.depth == node.depth + child.length
                assert self.token(child, 0) == key
        assert seen == self.num_nodes, (seen, self.num_nodes)
