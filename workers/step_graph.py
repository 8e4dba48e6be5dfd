"""A decode step on CPU as one onnxruntime graph: every layer, the final norm, the head.

A decode step is one new token for each of B sequences. Run layer by layer, one sequence's int4 step cost 61
onnxruntime calls and ~150 torch ops between them (~17 ms/token at 512 cached tokens, of which ~7 ms were
Python and torch overhead, bench/NOTES.md); as one graph it is one call. An fp32 model's step is the same
graph over its dense weights: torch's eager decode spends about half its time between the matmuls on this
size of model, and the graph measured 2x faster (bench/NOTES.md).

Attention is onnxruntime's GroupQueryAttention over the KV buffer in place: each layer's [B, Hkv, capacity,
D] keys and values are bound as the op's past and present (the same memory), so the op rotates q and k by
each token's position, writes each row's new key and value at that row's length and attends the tokens up
to it, with no copy in or out. One node a layer replaced ~45 (splits, reshapes, a GEMM per head and
softmaxes): 90 vs 186 us a layer at 512 cached tokens (bench/NOTES.md).

The buffer is a sequence's own cache (B = 1) or a run of KVSlots' slots [lo, hi): sequences decoding in
one step share the weights' read. The op writes a key and value in *every* row, so a slot in the run that
this step does not decode (free, held by a sequence prefilling in the same forward, or verifying a tree)
gets its row's discarded output at its length, past what it holds: nothing reads there before its own
tokens overwrite it (a prompt chunk's torch pass and a tree's call run after the decodes' calls). A holder
with no room left there keeps the whole run off the step (llama.py says where).

A speculation tree (the pending token and its draft nodes, under the tree's mask) is one row of S tokens:
the op attends causally within the new tokens and the mask, as an additive bias, hides non-ancestors;
its keys and values land after the row's length in node order, as the torch path writes them. The op
takes several new tokens per row only with one row, so each tree is a call of its own. Verifying a
17-node tree through the graph costs about one decode step, where torch eager's costs three (bench/NOTES.md).

Decodes whose caches read one shared prefix in place (shared_prefix.py) ride along in a call as its *readers*:
the same matmuls over their rows, but their attention is written out in the graph, because the op knows one KV
buffer and returns no log-sum-exp to merge a second one with. Their queries attend the prefix as one GEMM for
the whole group (every member's rows against one read of its KV, which is what makes sharing cheaper than
copies) and their own tokens after it plus the new one, under one softmax over both parts. Their new keys and
values come out of the graph and are written into their slots after it (one indexed copy for all layers).
A call needs at least one row for the op (it faults on an empty batch): readers with no decodes beside them
get a pad row over a one-token scratch buffer. Each layer's reader nodes sit in an If on `has_readers`, so a
step without readers runs a branch that passes the decodes' attention on: the readers path costs such a step
~4% at one row, where the nodes alone, run empty, cost 11% (bench/NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeTable

from .forward_batch import SequenceChunk
from .kv_slots import KVSlots, SlotKVCache, shared_prefix
from .onnx_graph import GraphBuilder, GraphWeight, OrtGraph, TensorSpec
from .quantized_layer import LayerParts, LayerWeights, finish_nodes, qkv_nodes
from .shared_prefix import SharedPrefix


@dataclass
class PrefixReaders:
    """A call's decodes over one shared prefix, read in place: their own tokens sit after it in a run of
    KVSlots' slots (see the module's docstring)."""

    prefix_keys: torch.Tensor  # [layers, Hkv, P, D], each layer contiguous
    prefix_values: torch.Tensor
    keys: torch.Tensor  # [layers, R, Hkv, capacity, D]: the run of slots holding their own tokens
    values: torch.Tensor
    rows: torch.Tensor  # [G] long: each reader's row of the run
    lengths: torch.Tensor  # [G] long: tokens each holds, the prefix's included; its new key goes there
    chunks: list[int]  # the forward's chunks they are

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[2]


@dataclass
class StepCall:
    """One run of the step graph over one KV buffer: B rows of one new token (decodes; a row with none is
    padded, see the module's docstring), or one row of S (a speculation tree); and maybe prefix readers."""

    keys: torch.Tensor  # [layers, B, Hkv, capacity, D]: every layer's [B, Hkv, capacity, D] is contiguous
    values: torch.Tensor
    lengths: torch.Tensor  # [B] long: tokens each buffer row holds; its new tokens' keys and values go after them
    tokens: int  # S
    chunks: list[int]  # the forward's chunks this call runs ...
    buffer_rows: list[int]  # ... and the buffer row of each
    readers: PrefixReaders | None = None


def fits(cache: KVCache, tokens: int = 1) -> bool:
    """Whether the op can run `tokens` new tokens in this cache: each layer's [Hkv, capacity, D] contiguous (a
    private cache or a KV slot) with room for them, and all of its KV there (not reading a shared prefix in
    place: see `_reads_prefix`)."""
    contiguous = cache.keys[0].is_contiguous() and cache.values[0].is_contiguous()
    return cache.length + tokens <= cache.capacity and contiguous and shared_prefix(cache) is None


def _reads_prefix(chunk: SequenceChunk) -> bool:
    """Whether the chunk is a decode the step can run as a prefix reader: one generated token, in a KV slot
    with room for it, after a shared prefix."""
    cache = chunk.cache
    single = chunk.num_tokens == 1 and chunk.attn_mask is None and not chunk.prompt
    in_slot = isinstance(cache, SlotKVCache) and cache.slots is not None and cache.length < cache.capacity
    return single and in_slot and shared_prefix(cache) is not None


def _within_causal(chunk: SequenceChunk) -> bool:
    """Whether the chunk's mask lets no token see a later one of the chunk."""
    assert chunk.attn_mask is not None
    own = chunk.attn_mask[:, chunk.cache.length :]  # [n, n]
    return not bool(torch.triu(own, diagonal=1).any())


def _over_slots(slots: KVSlots, chunks: list[SequenceChunk], members: list[int]) -> StepCall | None:
    indices = [chunks[i].cache.index for i in members]  # type: ignore[attr-defined]
    tokens = max(chunks[i].num_tokens for i in members)
    lo, hi = min(indices), max(indices) + 1
    lengths = torch.zeros(hi - lo, dtype=torch.long)  # a free slot's row writes at 0
    for slot in range(lo, hi):
        holder = slots.holder(slot)
        if holder is not None:
            if holder.length + tokens > slots.capacity:  # no room for the row's writes: see the module's docstring
                return None
            lengths[slot - lo] = holder.length
    return StepCall(slots.keys[:, lo:hi], slots.values[:, lo:hi], lengths, tokens, members, [i - lo for i in indices])


def _cache_names(index: int) -> tuple[str, str, str, str]:
    """A layer's cached keys and values as the graph's inputs (past) and outputs (present)."""
    p = f"layer{index}."
    return f"{p}past_key", f"{p}past_value", f"{p}present_key", f"{p}present_value"


def _reader_names(index: int) -> tuple[str, str, str, str]:
    """A layer's inputs for prefix readers: the prefix's keys and values, their slots' keys and values."""
    p = f"layer{index}."
    return f"{p}prefix_key", f"{p}prefix_value", f"{p}own_key", f"{p}own_value"


NEW_KV = ("new_keys", "new_values")  # the readers' new keys and values, every layer's: [G, layers, Hkv * D]


class StepGraph:
    def __init__(self, layers: list[LayerParts], final_norm: torch.Tensor, head: GraphWeight, rope: RopeTable) -> None:
        first = layers[0].weights
        hidden, d = first.o.shape[0], first.head_dim
        self.layers = len(layers)
        self.kv_heads, self.head_dim, self._rep = first.kv_heads, d, first.heads // first.kv_heads
        g = GraphBuilder()
        g.constant("token_axis", np.array([2], np.int64))  # of a [rows, Hkv, tokens, D] KV buffer
        # GroupQueryAttention's RoPE tables: [positions, D / 2], the first half of RopeTable's (halves repeat)
        rope_tables = (
            g.constant("cos_table", rope.cos[:, : d // 2].float().cpu().numpy()),
            g.constant("sin_table", rope.sin[:, : d // 2].float().cpu().numpy()),
        )
        _step_nodes(g, layers, final_norm, head, rope_tables)
        cache = TensorSpec(("B", first.kv_heads, "capacity", d))
        prefix, own = TensorSpec((first.kv_heads, "P", d)), TensorSpec(("R", first.kv_heads, "capacity", d))
        caches, readers = {}, {}
        for i in range(self.layers):
            caches |= dict.fromkeys(_cache_names(i)[:2], cache)
            readers |= dict(zip(_reader_names(i), (prefix, prefix, own, own), strict=True))
        shape = TensorSpec((4,), np.int64)
        inputs = {
            "h": hidden,  # [B * S + G, d]
            "row_split": TensorSpec((2,), np.int64),  # (B * S, G)
            "row_tokens": TensorSpec((3,), np.int64),  # (B, S, q + 2 kv): the decodes' rows' shape for attention
            "position": TensorSpec(("B", "S"), np.int64),
            "seqlens_k": TensorSpec(("B",), np.int32),  # tokens each row holds with its new ones, minus one
            "total_length": TensorSpec((), np.int32),  # the most any row holds with its new ones
            "attention_bias": TensorSpec(("B", 1, "S", "T")),  # 0 or -inf: a tree's mask within the causal one
            "has_readers": TensorSpec((), np.bool_),  # G > 0
            "reader_position": TensorSpec(("G", 1), np.int64),
            "reader_rows": TensorSpec(("G",), np.int64),  # each reader's row of the run of slots (own_key's R)
            "own_start": TensorSpec((1,), np.int64),  # P: their own tokens' first position in the slots ...
            "own_end": TensorSpec((1,), np.int64),  # ... P + O, O = the most any of them holds
            "reader_bias": TensorSpec(("G", 1, 1, "O1")),  # over own tokens and the new one: 0, or -inf past its own
            "reader_split": TensorSpec((2,), np.int64),  # (P, O + 1): a reader's scores, prefix then own
            "prefix_scores_shape": shape,  # (Hkv, G, rep, P)
            "prefix_probs_shape": TensorSpec((3,), np.int64),  # (Hkv, G * rep, P)
            **caches,
            **readers,
        }
        self.qkv_width = first.qkv.shape[0]
        new_kv = TensorSpec(("G", self.layers, first.kv_heads * d))
        graph_outputs: dict = {"logits": head.out_features}
        graph_outputs |= {name: cache for i in range(self.layers) for name in _cache_names(i)[2:]}
        graph_outputs |= dict.fromkeys(NEW_KV, new_kv)
        self._graph = OrtGraph(g.build(inputs, graph_outputs), graph_outputs, g.external)
        # a call with readers only gives the op this pad row (it faults on an empty batch): [layers, 1, Hkv, 1, D]
        self._pad_keys = torch.zeros(self.layers, 1, first.kv_heads, 1, d)
        self._pad_values = torch.zeros_like(self._pad_keys)
        self._joined: dict[tuple, tuple[SharedPrefix, torch.Tensor, torch.Tensor]] = {}
        self._no_readers = self._reader_inputs(None, torch.zeros(0, dtype=torch.long))
        self._no_new_kv = [torch.empty(0, self.layers, first.kv_heads * d) for _ in range(2)]

    def plan(self, chunks: list[SequenceChunk]) -> tuple[list[StepCall], list[int]]:
        """The step calls that run a forward's generated tokens: per KV buffer (a KVSlots buffer, or a private
        cache) one for its single-token decodes, which also takes the decodes that read one shared prefix in
        place as its readers (readers of another prefix get calls of their own); one per speculation tree (a
        chunk under a mask: the op takes several new tokens in a row only for one row). And the indices of the
        chunks left for the other paths (prompts, caches the step cannot take)."""
        calls: list[StepCall | None] = []
        trees: list[StepCall | None] = []  # last: a decode call's pad row may write in a tree's or a reader's slot
        decodes: dict[int, tuple[KVSlots, list[int]]] = {}  # buffer id -> the buffer, its chunks
        readers: dict[tuple, tuple[KVSlots, SharedPrefix, list[int]]] = {}  # (buffer id, prefix) -> ...
        for i, chunk in enumerate(chunks):
            cache, tree = chunk.cache, chunk.attn_mask is not None
            if _reads_prefix(chunk):
                prefix = shared_prefix(cache)
                assert isinstance(cache, SlotKVCache) and cache.slots is not None and prefix is not None
                readers.setdefault((id(cache.slots), prefix.identity), (cache.slots, prefix, []))[2].append(i)
                continue
            if chunk.prompt or (chunk.num_tokens > 1 and not tree) or not fits(cache, chunk.num_tokens):
                continue  # (unmarked causal runs of tokens are prompts, as ForwardBatch.single has them)
            if tree and not _within_causal(chunk):
                continue  # the graph's attention is causal: a mask can only hide more (as a tree's does)
            if not (isinstance(cache, SlotKVCache) and cache.slots is not None):
                lengths = torch.tensor([cache.length])
                calls.append(StepCall(cache.keys[:, None], cache.values[:, None], lengths, chunk.num_tokens, [i], [0]))
            elif tree:
                trees.append(_over_slots(cache.slots, chunks, [i]))
            else:
                decodes.setdefault(id(cache.slots), (cache.slots, []))[1].append(i)
        by_buffer = {buffer: _over_slots(slots, chunks, members) for buffer, (slots, members) in decodes.items()}
        calls += by_buffer.values()
        joined: dict[tuple, tuple[SharedPrefix, torch.Tensor, torch.Tensor]] = {}
        for (buffer, _), (slots, prefix, members) in readers.items():
            group = self._readers(slots, prefix, chunks, members, joined)
            host = by_buffer.get(buffer)
            if host is not None and host.readers is None:
                host.readers = group
            else:  # after every decode call: their pad rows write at a reader's length too, as it does
                pad = torch.zeros(1, dtype=torch.long)
                calls.append(StepCall(self._pad_keys, self._pad_values, pad, 1, [], [], group))
        self._joined = joined  # joined copies live while some step reads them
        taken = [call for call in calls + trees if call is not None]
        served = {i for call in taken for i in call.chunks + (call.readers.chunks if call.readers else [])}
        return taken, [i for i in range(len(chunks)) if i not in served]

    def _readers(
        self,
        slots: KVSlots,
        prefix: SharedPrefix,
        chunks: list[SequenceChunk],
        members: list[int],
        joined: dict[tuple, tuple[SharedPrefix, torch.Tensor, torch.Tensor]],
    ) -> PrefixReaders:
        indices = [chunks[i].cache.index for i in members]  # type: ignore[attr-defined]
        lo, hi = min(indices), max(indices) + 1
        whole = prefix.layer_contiguous()
        if whole is None:  # pieces of several tree nodes: one joined copy for all readers, kept between steps
            kept = self._joined.get(prefix.identity) or joined.get(prefix.identity)
            joined[prefix.identity] = kept or (prefix, *prefix.joined())  # (the prefix keeps its identity's memory)
            whole = joined[prefix.identity][1:]
        return PrefixReaders(
            prefix_keys=whole[0],
            prefix_values=whole[1],
            keys=slots.keys[:, lo:hi],
            values=slots.values[:, lo:hi],
            rows=torch.tensor([index - lo for index in indices]),
            lengths=torch.tensor([chunks[i].cache.length for i in members]),
            chunks=members,
        )

    def __call__(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        bias: torch.Tensor,
        reader_positions: torch.Tensor,
        call: StepCall,
    ) -> torch.Tensor:
        """h [B * S + G, d] (the tokens' embeddings: S per buffer row, then one per reader) at positions [B, S]
        and reader_positions [G], under bias [B, 1, S, max length + S] (0 where a token may attend, -inf where a
        tree hides it; causal order applies anyway): each row attends its length's cached tokens and its own
        earlier ones, each reader the prefix and its own tokens, and gets its keys and values written after its
        length (the caller advances the lengths of the caches it serves) -> logits [B * S + G, V]."""
        rows, tokens = len(call.lengths), call.tokens
        inputs = {
            "h": h,
            "row_split": torch.tensor([rows * tokens, h.shape[0] - rows * tokens]),
            "row_tokens": torch.tensor([rows, tokens, self.qkv_width]),
            "position": positions.to(torch.int64),
            "seqlens_k": (call.lengths + tokens - 1).to(torch.int32),
            "total_length": (call.lengths.max() + tokens).to(torch.int32),
            "attention_bias": bias,
        }
        presents: dict[str, torch.Tensor] = {}  # the same memory as the pasts: the op appends in place
        for index in range(self.layers):
            past_key, past_value, present_key, present_value = _cache_names(index)
            keys, values = call.keys[index], call.values[index]  # [B, Hkv, capacity, D]
            if not (keys.is_contiguous() and values.is_contiguous()):
                raise ValueError("a step call's KV buffer must be contiguous per layer (see fits)")
            inputs |= {past_key: keys, past_value: values}
            presents |= {present_key: keys, present_value: values}
        readers = call.readers
        if readers is None:  # the same tensors every step: their bindings stay (OrtGraph.run)
            new_keys, new_values = self._no_new_kv
            inputs |= self._no_readers
        else:
            new_keys = torch.empty(len(readers.rows), self.layers, self.kv_heads * self.head_dim)  # [G, L, Hkv * D]
            new_values = torch.empty_like(new_keys)
            inputs |= self._reader_inputs(readers, reader_positions)
        logits = self._graph.run(inputs, into=presents | dict(zip(NEW_KV, (new_keys, new_values), strict=True)))[0]
        if readers is not None:  # written after their lengths, every layer at once ([G, layers, Hkv, D] each)
            rows, at, shape = readers.rows, readers.lengths, (len(readers.rows), self.layers, self.kv_heads, -1)
            readers.keys[:, rows, :, at] = new_keys.view(shape)
            readers.values[:, rows, :, at] = new_values.view(shape)
        return logits

    def _reader_inputs(self, readers: PrefixReaders | None, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph's reader inputs: a call without readers binds empty ones (and the pad buffer as their slots)."""
        kv_heads, d = self.kv_heads, self.head_dim
        if readers is None:
            prefix = [torch.empty(self.layers, kv_heads, 0, d)] * 2
            own, rows, start = [self._pad_keys, self._pad_values], torch.zeros(0, dtype=torch.long), 0
            held = torch.zeros(0, 1, dtype=torch.long)
        else:
            prefix = [readers.prefix_keys, readers.prefix_values]
            own, rows, start = [readers.keys, readers.values], readers.rows, readers.prefix_length
            held = (readers.lengths - start)[:, None]  # [G, 1] own tokens each holds
        most = int(held.max()) if len(held) else 0  # O
        span = torch.arange(most + 1)  # own positions, the new token's last
        visible = (span < held) | (span == most)  # [G, O + 1]
        bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None]  # [G, 1, 1, O + 1]
        groups, rep = len(rows), self._rep
        inputs = {
            "has_readers": torch.tensor(readers is not None),
            "reader_position": positions.to(torch.int64).reshape(-1, 1),
            "reader_rows": rows,
            "own_start": torch.tensor([start]),
            "own_end": torch.tensor([start + most]),
            "reader_bias": bias,
            "reader_split": torch.tensor([start, most + 1]),
            "prefix_scores_shape": torch.tensor([kv_heads, groups, rep, start]),
            "prefix_probs_shape": torch.tensor([kv_heads, groups * rep, start]),
        }
        for index in range(self.layers):
            names = _reader_names(index)
            inputs |= dict(zip(names, (prefix[0][index], prefix[1][index], own[0][index], own[1][index]), strict=True))
        return inputs


def _step_nodes(
    g: GraphBuilder, layers: list[LayerParts], final_norm: torch.Tensor, head: GraphWeight, rope: tuple[str, str]
) -> None:
    """The step's nodes: every layer (the prefix readers' rows after the decodes'), the final norm, the head."""
    first = layers[0].weights
    q_width, d = first.heads * first.head_dim, first.head_dim
    flat = g.constant("flat_attn", np.array([-1, q_width], np.int64))
    h, new_kv = "h", []
    for i, parts in enumerate(layers):
        p, w = f"layer{i}.", parts.weights
        past_key, past_value, present_key, present_value = _cache_names(i)
        # rows: the decodes' B * S, then the readers' G
        g.node("Split", [qkv_nodes(g, parts, h, p), "row_split"], [f"{p}qkv.decodes", f"{p}qkv.readers"], axis=0)
        g.node("Reshape", [f"{p}qkv.decodes", "row_tokens"], [f"{p}qkv.rows"])  # [B, S, q + 2 kv]
        g.node(
            "GroupQueryAttention",
            [
                f"{p}qkv.rows",
                *("", "", past_key, past_value, "seqlens_k", "total_length", *rope),
                *("position", "attention_bias"),
            ],
            [f"{p}attn.rows", present_key, present_value],
            domain="com.microsoft",
            num_heads=w.heads,
            kv_num_heads=w.kv_heads,
            scale=d**-0.5,
            do_rotary=1,
            rotary_interleaved=0,  # HF's rotate_half layout, as kvcomm/rope.py
        )
        g.node("Reshape", [f"{p}attn.rows", flat], [f"{p}attn.decodes"])  # [B * S, Hq * D]
        new_kv.append(_readers_if(g, w, i, rope))  # -> attn [B * S + G, Hq * D]
        h = finish_nodes(g, parts, h, f"{p}attn", p)
    norm = g.constant("final_norm", final_norm.float().numpy())
    g.node("SimplifiedLayerNormalization", [h, norm], ["final_normed"], axis=-1, epsilon=first.eps)
    g.matmul("final_normed", head, "logits", name="head")
    for kind, name in enumerate(NEW_KV):  # [G, 1, Hkv * D] a layer -> [G, layers, Hkv * D]
        g.node("Concat", [layer[kind] for layer in new_kv], [name], axis=1)


def _readers_if(g: GraphBuilder, w: LayerWeights, index: int, rope: tuple[str, str]) -> tuple[str, str]:
    """Layer `index`'s attention rows: the decodes' `attn.decodes`, then, when there are prefix readers, theirs
    (below), as `layer{index}.attn` [B * S + G, Hq * D] -> the names of the readers' new keys and values [G, 1,
    Hkv * D] (empty without readers). The branch without readers spares a step their ~35 nodes a layer."""
    p = f"layer{index}."
    reading = g.branch(f"{p}readers", partial(_with_readers, g, w, rope, index))
    kv_width = w.kv_heads * w.head_dim
    none = g.branch(f"{p}no_readers", partial(_no_readers, g, (0, 1, kv_width), p))
    outputs = [f"{p}attn", f"{p}new_key", f"{p}new_value"]
    g.node("If", ["has_readers"], outputs, then_branch=reading, else_branch=none)
    return outputs[1], outputs[2]


def _with_readers(g: GraphBuilder, w: LayerWeights, rope: tuple[str, str], index: int) -> list[str]:
    """The branch with readers: the decodes' attention rows, then the readers'; their new keys and values."""
    p = f"layer{index}."
    attn, new_key, new_value = _reader_attention_nodes(g, w, f"{p}qkv.readers", rope, index)
    g.node("Concat", [f"{p}attn.decodes", attn], [f"{p}attn.all"], axis=0)
    return [f"{p}attn.all", new_key, new_value]


def _no_readers(g: GraphBuilder, empty_kv: tuple[int, ...], p: str) -> list[str]:
    """The branch without readers: the decodes' attention rows as they are, and empty new keys and values."""
    empty = g.constant("no_readers_kv", np.zeros(empty_kv, np.float32))
    names = [f"{p}no_readers.attn", f"{p}no_readers.key", f"{p}no_readers.value"]
    for source, name in zip([f"{p}attn.decodes", empty, empty], names, strict=True):
        g.node("Identity", [source], [name])
    return names


def _reader_attention_nodes(g: GraphBuilder, w: LayerWeights, qkv: str, rope: tuple[str, str], index: int) -> list[str]:
    """Prefix readers' attention, written out: qkv [G, q + 2 kv] (not rotated) -> the names of their attention
    [G, Hq * D] and their rotated new keys and values [G, 1, Hkv * D]. Scores [G, Hkv, rep, P + O + 1]: the
    prefix's (one GEMM of every reader's rows over [Hkv, P, D]), their own tokens' and the new token's."""
    prefix_key, prefix_value, own_key, own_value = _reader_names(index)
    p = f"layer{index}."
    kv_heads, d = w.kv_heads, w.head_dim
    rep, scale = w.heads // kv_heads, d**-0.5
    r = f"{p}reader."
    new_key, new_value = f"{r}new_key", f"{r}new_value"
    widths = g.constant(f"{r}widths", np.array([w.heads * d, kv_heads * d, kv_heads * d], np.int64))
    by_head = g.constant(f"{r}by_head", np.array([-1, kv_heads, rep, d], np.int64))  # [G, Hkv, rep, D]
    head_rows = g.constant(f"{r}head_rows", np.array([kv_heads, -1, d], np.int64))  # [Hkv, G * rep, D]
    per_row = g.constant(f"{r}per_row", np.array([kv_heads, -1, rep, d], np.int64))  # [Hkv, G, rep, D]
    one_token = g.constant(f"{r}one_token", np.array([-1, kv_heads, 1, d], np.int64))  # [G, Hkv, 1, D]
    flat = g.constant(f"{r}flat", np.array([-1, w.heads * d], np.int64))
    axes = g.constant(f"{r}axes", np.array([1], np.int64))
    position, swap = "reader_position", [1, 0, 2, 3]
    g.node("Unsqueeze", [qkv, axes], [f"{r}qkv"])  # [G, 1, q + 2 kv]
    g.node("Split", [f"{r}qkv", widths], [f"{r}q_raw", f"{r}k_raw", new_value], axis=-1)
    for raw, rotated, heads in ((f"{r}q_raw", f"{r}q", w.heads), (f"{r}k_raw", new_key, kv_heads)):
        g.node("RotaryEmbedding", [raw, position, *rope], [rotated], domain="com.microsoft", num_heads=heads)
    g.node("Reshape", [f"{r}q", by_head], [f"{r}q_heads"])  # [G, Hkv, rep, D]
    g.node("Transpose", [f"{r}q_heads"], [f"{r}q_by_head"], perm=swap)  # [Hkv, G, rep, D]
    g.node("Reshape", [f"{r}q_by_head", head_rows], [f"{r}q_rows"])  # [Hkv, G * rep, D]
    fused = {"domain": "com.microsoft", "transB": 1, "alpha": scale}  # a @ b^T * scale
    g.node("FusedMatMul", [f"{r}q_rows", prefix_key], [f"{r}prefix_rows"], **fused)
    # shapes given at run time say sizes: a 0 there (no readers) is not "keep the input's dim"
    exact = {"allowzero": 1}
    g.node("Reshape", [f"{r}prefix_rows", "prefix_scores_shape"], [f"{r}prefix_by_head"], **exact)  # [Hkv, G, rep, P]
    g.node("Transpose", [f"{r}prefix_by_head"], [f"{r}prefix_scores"], perm=swap)  # [G, Hkv, rep, P]
    for cached, new, name in ((own_key, new_key, "keys"), (own_value, new_value, "values")):
        g.node("Slice", [cached, "own_start", "own_end", "token_axis"], [f"{r}{name}.run"])  # [R, Hkv, O, D]
        g.node("Gather", [f"{r}{name}.run", "reader_rows"], [f"{r}{name}.own"], axis=0)  # [G, Hkv, O, D]
        g.node("Reshape", [new, one_token], [f"{r}{name}.new"])
        g.node("Concat", [f"{r}{name}.own", f"{r}{name}.new"], [f"{r}{name}"], axis=2)  # [G, Hkv, O + 1, D]
    g.node("FusedMatMul", [f"{r}q_heads", f"{r}keys"], [f"{r}own_raw"], **fused)
    g.node("Add", [f"{r}own_raw", "reader_bias"], [f"{r}own_scores"])  # [G, Hkv, rep, O + 1]
    g.node("Concat", [f"{r}prefix_scores", f"{r}own_scores"], [f"{r}scores"], axis=-1)
    g.node("Softmax", [f"{r}scores"], [f"{r}probs"], axis=-1)
    g.node("Split", [f"{r}probs", "reader_split"], [f"{r}prefix_probs", f"{r}own_probs"], axis=-1)
    g.node("Transpose", [f"{r}prefix_probs"], [f"{r}prefix_probs_by_head"], perm=swap)  # [Hkv, G, rep, P]
    g.node("Reshape", [f"{r}prefix_probs_by_head", "prefix_probs_shape"], [f"{r}prefix_probs_rows"], **exact)
    g.node("MatMul", [f"{r}prefix_probs_rows", prefix_value], [f"{r}prefix_out_rows"])  # [Hkv, G * rep, D]
    g.node("Reshape", [f"{r}prefix_out_rows", per_row], [f"{r}prefix_out_by_head"])
    g.node("Transpose", [f"{r}prefix_out_by_head"], [f"{r}prefix_out"], perm=swap)  # [G, Hkv, rep, D]
    g.node("MatMul", [f"{r}own_probs", f"{r}values"], [f"{r}own_out"])  # [G, Hkv, rep, D]
    g.node("Add", [f"{r}prefix_out", f"{r}own_out"], [f"{r}out"])
    g.node("Reshape", [f"{r}out", flat], [f"{r}attn"])  # [G, Hq * D]
    return [f"{r}attn", new_key, new_value]
