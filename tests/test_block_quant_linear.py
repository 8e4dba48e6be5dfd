"""The int4/int8 weight formats: onnxruntime's MatMulNBits over the GGUF's own block grids, fp32 for prefill."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmesh.bench.bench_common import SAMPLE_TEXT, all_logits, decode_logits, logits_distance
from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import rotate
from kvmesh.workers.block_quant_linear import DENSE_FROM_ROWS, BlockQuantLinear
from kvmesh.workers.engine import Engine, EngineConfig
from kvmesh.workers.forward_batch import ForwardBatch, SequenceChunk
from kvmesh.workers.kv_slots import KVSlots
from kvmesh.workers.linear import make_linear
from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.onnx_graph import GROUP, DenseWeight, GraphBuilder, OrtGraph
from kvmesh.workers.sampling import SamplingParams
from kvmesh.workers.scheduler import SchedulerConfig
from kvmesh.workers.speculation import tree_inputs
from kvmesh.workers.step_graph import fits
from kvmesh.workers.suffix_cache import Draft

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def int4(raw_model) -> LlamaModel:
    """The real model in int4 (a Q4_1 GGUF's own codes, its Q8_0 head in int8), built once for this file."""
    return LlamaModel(raw_model.config, raw_model.weights, weight_format="int4")


def _q4_1_grid(out_features: int, in_features: int) -> torch.Tensor:
    """Weights as a Q4_1 file holds them: low + scale * code per group of 32, each group using codes 0 and 15
    (llama.cpp's quantizer maps a group's min and max there)."""
    codes = torch.randint(0, 16, (out_features, in_features // GROUP, GROUP)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(out_features, in_features // GROUP, 1) * 0.02 + 0.001
    low = -torch.rand(out_features, in_features // GROUP, 1) * 0.1
    return (codes * scale + low).reshape(out_features, in_features)


def _q8_0_grid(out_features: int, in_features: int) -> torch.Tensor:
    """Weights as a Q8_0 file holds them: scale * code, code in -127..127, each group reaching 127."""
    codes = torch.randint(-127, 128, (out_features, in_features // GROUP, GROUP)).float()
    codes[..., 0] = 127
    scale = torch.rand(out_features, in_features // GROUP, 1) * 0.02 + 0.001
    return (codes * scale).reshape(out_features, in_features)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded to symmetric int8 per group of 32, as the kernel quantizes activations."""
    groups = x.reshape(x.shape[0], -1, GROUP)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(groups / scale) * scale).reshape_as(x)


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).abs().max() / reference.abs().max())


def _assert_same_caches(ours: list[KVCache], references: list[KVCache], tolerance: float) -> None:
    """Each cache holds as many tokens as its reference, every layer's keys and values within `tolerance`."""
    for mine, theirs in zip(ours, references, strict=True):
        assert mine is not None and mine.length == theirs.length
        for layer in range(mine.num_layers):
            for a, b in zip(mine.layer(layer, mine.length), theirs.layer(layer, theirs.length), strict=True):
                assert _relative_error(a, b) < tolerance


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_decode_rows_compute_the_files_weights_with_int8_activations_and_prefill_rows_are_exact(fmt: str) -> None:
    torch.manual_seed(0)
    weight = _q4_1_grid(96, 128) if fmt == "int4" else _q8_0_grid(96, 128)
    linear = make_linear(weight, fmt, CPU)
    assert isinstance(linear, BlockQuantLinear)
    x = torch.randn(3, 128)
    if fmt == "int4":  # the group offsets are added in fp32; only the codes' part sees int8 activations
        offsets = (
            weight.reshape(96, -1, GROUP).amin(-1)
            + 8 * (weight.reshape(96, -1, GROUP).amax(-1) - weight.reshape(96, -1, GROUP).amin(-1)) / 15
        )
        centred = weight - offsets.repeat_interleave(GROUP, dim=1)
        expected = _int8_activations(x) @ centred.T + x.reshape(3, -1, GROUP).sum(-1) @ offsets.T
    else:
        expected = _int8_activations(x) @ weight.T
    assert _relative_error(linear(x), expected) < 1e-5  # the file's grid, reproduced: nothing else rounded
    assert _relative_error(linear(x), x @ weight.T) > 1e-4  # ... and the activations were quantized
    rows = torch.randn(DENSE_FROM_ROWS, 128)
    assert _relative_error(linear(rows), rows @ weight.T) < 1e-5  # prefill-sized: fp32


def test_a_dense_graph_outlives_the_arrays_it_was_built_from() -> None:
    """A dense weight reaches onnxruntime as an external initializer (declared in the model, read from the
    array); the graph releases the array when this onnxruntime copies it at load (probed) and keeps it
    otherwise. Either way the product stays right after the caller's array is gone and its memory reused
    (with today's onnxruntime, which copies, what can fail here is the loading of external initializers)."""
    weight = torch.randn(384, 256)
    expected_weight = weight.clone()
    g = GraphBuilder()
    g.matmul("x", DenseWeight(weight.numpy()), "y", name="w")
    graph = OrtGraph(g.build({"x": 256}, {"y": 384}), {"y": 384}, g.external)
    del g, weight
    reused = [torch.full((384, 256), float("nan")) for _ in range(64)]  # the freed blocks, overwritten
    x = torch.randn(3, 256)
    assert torch.allclose(graph(x=x)[0], x @ expected_weight.T, atol=1e-4)
    assert reused


def test_a_graph_keeps_unchanged_bindings_and_reads_what_they_hold_now() -> None:
    """Bindings outlive a run and are made again only for other memory, shape or type: a run over the same
    tensors reads their current values (written in place between runs), another tensor or shape is bound anew,
    and an empty tensor (address 0, which onnxruntime refuses) binds too."""
    weight = torch.randn(16, 8)
    g = GraphBuilder()
    g.matmul("x", DenseWeight(weight.numpy()), "y", name="w")
    graph = OrtGraph(g.build({"x": 8}, {"y": 16}), {"y": 16}, g.external)
    x, y = torch.randn(2, 8), torch.empty(2, 16)
    for _ in range(2):
        graph.run({"x": x}, into={"y": y})
        torch.testing.assert_close(y, x @ weight.T, atol=1e-5, rtol=0)
        x.mul_(-3.0)  # the same memory, new values
    for other in (torch.randn(2, 8), torch.randn(5, 8), torch.empty(0, 8)):
        torch.testing.assert_close(graph(x=other)[0], other @ weight.T, atol=1e-5, rtol=0)


def test_block_quant_linear_rejects_shapes_and_widths_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        make_linear(torch.randn(8, 48), "int4", CPU)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        BlockQuantLinear(torch.randn(8, 64), bits=3, dense=make_linear(torch.randn(8, 64), "fp32", CPU))


def test_int4_smollm2_decodes_near_fp32_and_prefills_exactly(raw_model, model: LlamaModel, int4: LlamaModel) -> None:
    """The real model in int4 (a Q4_1 GGUF's own codes, its Q8_0 head in int8): prompt logits equal fp32's,
    decode logits stay close, and the forward gives torch its threads back."""
    assert type(int4.lm_head).__name__ == "BlockQuantLinear" and int4.lm_head.bits == 8
    assert all(layer.decode is not None for layer in int4.layers)
    prompt = raw_model.tokenizer.encode(SAMPLE_TEXT)[:96]
    reference = all_logits(model, prompt)
    assert torch.equal(all_logits(int4, prompt), reference)  # 96 rows: the fp32 kernels
    threads = torch.get_num_threads()
    distance = logits_distance(reference, decode_logits(int4, prompt))
    assert torch.get_num_threads() == threads
    # measured on this prompt: 96.9% argmax agreement, mean KL 0.0041 (int8 activations are the only change)
    assert distance["argmax_agreement"] >= 0.9
    assert distance["kl_mean"] < 0.02
    assert distance["max_abs_logit_diff"] > 0  # the decode path did run the quantized kernel


def test_a_quantized_layers_fused_decode_graphs_compute_the_layers_math(
    raw_model, model: LlamaModel, int4: LlamaModel
) -> None:
    """A layer's onnxruntime graphs against the same layer written out with lone quantized linears and torch
    ops (RoPE, SDPA, RMSNorm, SwiGLU): only the order of float sums may differ, since both round the
    activations entering each matmul to int8 the same way."""
    c, index = int4.config, 3
    layer = int4.layers[index]
    assert layer.decode is not None
    prefix = f"model.layers.{index}"

    def lone(*names: str) -> BlockQuantLinear:
        w = torch.cat([raw_model.weights[f"{prefix}.{name}.weight"] for name in names])
        return make_linear(w, "int4", CPU)  # type: ignore[return-value]

    qkv, o = lone("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), lone("self_attn.o_proj")
    gate_up, down = lone("mlp.gate_proj", "mlp.up_proj"), lone("mlp.down_proj")
    norm, silu = torch.nn.functional.rms_norm, torch.nn.functional.silu

    def finish(h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h2 = h + o(attn)
        gate, up = gate_up(norm(h2, (c.hidden_size,), layer.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        return h2 + down(silu(gate) * up)

    torch.manual_seed(1)
    h, attn = torch.randn(5, c.hidden_size), torch.randn(5, c.q_size)
    cos, sin = int4.rotary(torch.arange(40, 45))
    raw = qkv(norm(h, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps))
    q = rotate(raw[:, : c.q_size].view(5, c.num_heads, c.head_dim), cos, sin)
    k = rotate(raw[:, c.q_size : c.q_size + c.kv_size].view(5, c.num_kv_heads, c.head_dim), cos, sin)
    for ours, expected in zip(int4.project_qkv(index, h, cos, sin), (q, k), strict=False):
        assert _relative_error(ours, expected) < 1e-4
    assert _relative_error(int4.finish_layer(index, h, attn), finish(h, attn)) < 1e-4

    rows = torch.randn(DENSE_FROM_ROWS, c.hidden_size)  # prefill-sized: the fp32 path, as the fp32 model's
    cos, sin = int4.rotary(torch.arange(DENSE_FROM_ROWS))
    pairs = zip(int4.project_qkv(index, rows, cos, sin), model.project_qkv(index, rows, cos, sin), strict=True)
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs)


# the step graph against the path it replaces: int4's layer graphs, fp32's torch eager; tolerances measured
# 4e-4 (int4: one tipped int8 rounding of an activation, ~1/254 of an input) and ~1e-6 (fp32: float sums' order)
STEP_FORMATS = [("int4", 2e-3), ("fp32", 1e-4)]


@pytest.mark.parametrize("fmt,tolerance", STEP_FORMATS)
def test_batch1_decode_as_one_graph_matches_the_layer_by_layer_path(raw_model, fmt: str, tolerance: float) -> None:
    """One sequence's next token runs as one graph (onnxruntime's attention extends the cache in place); the
    same tokens layer by layer (int4: torch's RoPE and SDPA between the layer graphs; fp32: torch eager) must
    give the same logits and the same cache: in a private cache and in a KV slot (a view of the shared buffer),
    for a first token into an empty cache, and at a position other than the cache's length (RoPE follows the
    position given). Three layers of the model: over all 30, int4's two paths' float sums (same values, other
    order) tip some int8 roundings of activations apart, and the runs drift ~3% apart as any two
    int8-activation runs would; the decode test above bounds that against fp32."""
    config = dataclasses.replace(raw_model.config, num_layers=3)
    graphed = LlamaModel(config, raw_model.weights, weight_format=fmt)  # type: ignore[arg-type]
    assert graphed.step is not None
    prompt = raw_model.tokenizer.encode(SAMPLE_TEXT)[:40]
    slots = KVSlots(num_layers=3, num_slots=2, num_kv_heads=config.num_kv_heads, capacity=64,
                    head_dim=config.head_dim, dtype=torch.float32, device=CPU)  # fmt: skip

    def run(cache: KVCache, one_graph: bool) -> torch.Tensor:
        step = graphed.step

        def decode(token: int, **options) -> torch.Tensor:
            graphed.step = step if one_graph else None  # None: the layer-by-layer path
            try:
                return graphed.forward(ForwardBatch.single(cache, [token], **options))  # type: ignore[return-value]
            finally:
                graphed.step = step

        logits = [decode(prompt[0])]  # a first token, nothing cached
        graphed.forward(ForwardBatch.single(cache, prompt[1:]))  # the prompt: fp32 on both sides
        logits += [decode(token) for token in (17, 4_000)]
        logits.append(decode(30, positions=torch.tensor([cache.length + 5])))
        return torch.cat(logits)

    for ours_cache in (graphed.new_cache(capacity=64), slots.acquire()):
        assert ours_cache is not None and fits(ours_cache)
        layered_cache = graphed.new_cache(capacity=64)
        ours, layered = run(ours_cache, True), run(layered_cache, False)
        assert ours_cache.length == layered_cache.length == 43
        assert _relative_error(ours, layered) < tolerance
        for layer in range(3):
            for mine, theirs in zip(ours_cache.layer(layer, 43), layered_cache.layer(layer, 43), strict=True):
                assert _relative_error(mine, theirs) < tolerance
    assert torch.equal(slots.keys[:, 1], torch.zeros_like(slots.keys[:, 1]))  # the other slot untouched


@pytest.mark.parametrize("fmt,tolerance", STEP_FORMATS)
def test_sequences_decoding_together_share_one_step_over_their_slots(raw_model, fmt: str, tolerance: float) -> None:
    """Three sequences of different lengths decode in one forward beside a fourth one's prefill chunk, while a
    fifth holds a slot among theirs and waits: the three take one step call over the slot run (the other two
    slots' rows get a discarded write past their lengths), the chunk an fp32 pass of its own; logits and every
    cache as when each sequence runs alone (its decode off the step: layer by layer, or torch eager)."""
    config = dataclasses.replace(raw_model.config, num_layers=2)
    graphed = LlamaModel(config, raw_model.weights, weight_format=fmt)  # type: ignore[arg-type]
    ids = raw_model.tokenizer.encode(SAMPLE_TEXT)
    prompts = [ids[:30], ids[30:41], ids[41:60], ids[60:77], ids[77:90]]
    decodes, prefilling, waiting = [0, 1, 4], 2, 3
    slots = KVSlots(num_layers=2, num_slots=6, num_kv_heads=config.num_kv_heads, capacity=64,
                    head_dim=config.head_dim, dtype=torch.float32, device=CPU)  # fmt: skip
    together = [slots.acquire() for _ in prompts]
    alone = [graphed.new_cache(capacity=64) for _ in prompts]
    for caches in (together, alone):
        for i in [*decodes, waiting]:
            graphed.forward(ForwardBatch.single(caches[i], prompts[i]))  # type: ignore[arg-type]
    new_tokens = {0: 17, 1: 4_000, 4: 30}
    chunks = [SequenceChunk(together[i], 1) for i in decodes[:2]]  # type: ignore[arg-type]
    chunks += [SequenceChunk(together[prefilling], 19, prompt=True), SequenceChunk(together[4], 1)]  # type: ignore[arg-type]
    tokens = torch.tensor([17, 4_000, *prompts[prefilling], 30])
    positions = torch.tensor([30, 11, *range(19), 13])
    calls, rest = graphed.step.plan(chunks)  # type: ignore[union-attr]
    assert [call.chunks for call in calls] == [[0, 1, 3]] and rest == [2]
    assert calls[0].lengths.tolist() == [30, 11, 0, 17, 13]  # slots 0-4: the waiting one's row writes at 17
    logits = graphed.forward(ForwardBatch(tokens, positions, chunks, torch.tensor([0, 1, 20, 21])))

    prefilled = graphed.forward(ForwardBatch.single(alone[prefilling], prompts[prefilling]))  # in fp32, as together
    step, graphed.step = graphed.step, None  # each sequence's decode alone, layer by layer
    try:
        expected = [graphed.forward(ForwardBatch.single(alone[i], [new_tokens[i]])) for i in decodes]
    finally:
        graphed.step = step
    expected.insert(2, prefilled)
    assert _relative_error(logits, torch.cat(expected)) < tolerance  # type: ignore[arg-type]
    _assert_same_caches(together, alone, tolerance)  # type: ignore[arg-type]


# int4: 5-row products tip more int8 roundings of activations than 1-row ones (2.8e-3 measured); fp32 ~1e-6
@pytest.mark.parametrize("fmt,tolerance", [("int4", 5e-3), ("fp32", 1e-4)])
def test_a_speculation_tree_runs_in_the_step_graph_beside_decodes(raw_model, fmt: str, tolerance: float) -> None:
    """A verify tree (pending token + 4 draft nodes, two branches) in a slot between two decoding slots: the
    decodes take one call over slots 0-2 (slot 1's row a discarded write), the tree a call of its own after it;
    the tree's logits and KV (every node, in node order) and the decodes' are those of the path the step
    replaces (layer graphs, or torch eager), each sequence alone."""
    config = dataclasses.replace(raw_model.config, num_layers=2)
    graphed = LlamaModel(config, raw_model.weights, weight_format=fmt)  # type: ignore[arg-type]
    ids = raw_model.tokenizer.encode(SAMPLE_TEXT)
    prompts = [ids[:30], ids[30:41], ids[41:60]]
    slots = KVSlots(num_layers=2, num_slots=3, num_kv_heads=config.num_kv_heads, capacity=64,
                    head_dim=config.head_dim, dtype=torch.float32, device=CPU)  # fmt: skip
    together = [slots.acquire() for _ in prompts]
    alone = [graphed.new_cache(capacity=64) for _ in prompts]
    for caches in (together, alone):
        for cache, prompt in zip(caches, prompts, strict=True):
            graphed.forward(ForwardBatch.single(cache, prompt))  # type: ignore[arg-type]
    draft = Draft(tokens=[11, 12, 13, 14], parents=[-1, -1, 0, 2], probs=[0.5, 0.3, 0.4, 0.3])
    tree_positions, mask = tree_inputs(draft, len(prompts[1]))
    tree_tokens = [4_000, *draft.tokens]
    chunks = [SequenceChunk(together[0], 1), SequenceChunk(together[1], 5, mask), SequenceChunk(together[2], 1)]  # type: ignore[arg-type]
    calls, rest = graphed.step.plan(chunks)  # type: ignore[union-attr]
    assert [(call.chunks, call.tokens) for call in calls] == [([0, 2], 1), ([1], 5)] and rest == []
    tokens = torch.tensor([17, *tree_tokens, 30])
    positions = torch.cat([torch.tensor([30]), tree_positions, torch.tensor([19])])
    logits = graphed.forward(ForwardBatch(tokens, positions, chunks, torch.arange(7)))

    step, graphed.step = graphed.step, None
    try:
        tree = ForwardBatch.single(alone[1], tree_tokens, positions=tree_positions, attn_mask=mask, all_logits=True)
        expected = [
            graphed.forward(ForwardBatch.single(alone[0], [17])),
            graphed.forward(tree),
            graphed.forward(ForwardBatch.single(alone[2], [30])),
        ]
    finally:
        graphed.step = step
    assert _relative_error(logits, torch.cat(expected)) < tolerance  # type: ignore[arg-type]
    _assert_same_caches(together, alone, tolerance)  # type: ignore[arg-type]


def test_an_int4_engine_batch_gives_each_request_its_greedy_tokens_alone(int4: LlamaModel, tokenizer) -> None:
    """The engine's steps mix decodes (one step call over the slots) with chunked prefills (fp32): three
    requests together produce the greedy tokens each produces alone. Without speculation: a verify tree's
    rows are a product of other shape than a decode's, whose float sums may differ in order, and with int8
    activations that can move logits by ~1% (a near-tie then goes the other way, as it would between any two
    int8-activation runs)."""
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]
    greedy = SamplingParams(max_tokens=10)

    def engine(max_batch_tokens: int) -> Engine:
        scheduler = SchedulerConfig(max_running=4, max_batch_tokens=max_batch_tokens)
        config = EngineConfig(scheduler=scheduler, speculation=None)
        return Engine(int4, tokenizer, config)

    prompts = [engine(256).chat_prompt(q) for q in questions]
    alone = [engine(256).generate([p], greedy)[0].token_ids for p in prompts]
    together = engine(24).generate(prompts, greedy)  # 24 tokens a step: prefill chunks beside decodes
    assert [c.token_ids for c in together] == alone


def test_an_fp32_engine_decodes_through_the_step_graph_with_torch_eagers_tokens(model: LlamaModel, tokenizer) -> None:
    """fp32 decodes take the step graph by default (speculation's verify trees and prompts stay in torch): three
    requests together, with speculation on, produce the greedy tokens torch eager produces for each alone."""
    assert model.step is not None
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]
    greedy = SamplingParams(max_tokens=24)
    prompts = [Engine(model, tokenizer).chat_prompt(q) for q in questions]
    step, model.step = model.step, None
    try:
        alone = [Engine(model, tokenizer).generate([p], greedy)[0].token_ids for p in prompts]
    finally:
        model.step = step
    config = EngineConfig(scheduler=SchedulerConfig(max_running=4, max_batch_tokens=24))
    together = Engine(model, tokenizer, config).generate(prompts, greedy)
    assert [c.token_ids for c in together] == alone


def test_an_int4_engine_copies_prefix_hits_rather_than_share_them(int4: LlamaModel, tokenizer) -> None:
    """The step graph attends one contiguous cache: a shared prefix would send decodes to the layer graphs
    (2.5x slower alone, other float sums: other tokens), so quantized models copy every hit."""
    config = EngineConfig(speculation=None, shared_prefix_min_tokens=16)
    engine = Engine(int4, tokenizer, config)
    context = tokenizer.encode(SAMPLE_TEXT)[:80]
    engine.generate([context], SamplingParams(max_tokens=1))
    for tail in ([11, 12, 13], [21, 22, 23]):
        engine.add_request(context + tail, SamplingParams(max_tokens=2))
    engine.step()
    assert [s.stats.prefix_hit_tokens for s in engine.scheduler.running] == [80, 80]
    assert all(s.cache.shared is None for s in engine.scheduler.running)
