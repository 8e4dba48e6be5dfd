"""A Llama-family decoder forward in plain PyTorch (RMSNorm, RoPE, GQA attention, SwiGLU)."""

from __future__ import annotations

from contextlib import nullcontext
from itertools import accumulate

import torch
import torch.nn.functional as F

from kvmesh.kvcomm.kv_cache import KVCache
from kvmesh.kvcomm.rope import RopeTable, rotate

from .attention import DecodeGroup, attend
from .block_quant_linear import DENSE_FROM_ROWS, BlockQuantLinear, decode_threads
from .forward_batch import ForwardBatch
from .linear import QUANTIZED_FORMATS, Linear, WeightFormat, head_format, make_linear
from .model_config import ModelConfig
from .model_files import ModelLoadError
from .onnx_graph import DenseWeight
from .quantized_layer import LayerWeights, QuantizedLayer, dense_layer, quantize_layer
from .step_graph import StepCall, StepGraph


def _layer_weights(weights: dict[str, torch.Tensor], prefix: str, config: ModelConfig) -> LayerWeights:
    """One layer's weights from the checkpoint, q/k/v and gate/up each as one matrix."""

    def take(name: str) -> torch.Tensor:
        key = f"{prefix}.{name}"
        if key not in weights:
            raise ModelLoadError(f"the checkpoint lacks {key}")
        return weights[key]

    attn, mlp = "self_attn", "mlp"
    return LayerWeights(
        qkv=torch.cat([take(f"{attn}.{p}_proj.weight") for p in "qkv"]),
        o=take(f"{attn}.o_proj.weight"),
        gate_up=torch.cat([take(f"{mlp}.gate_proj.weight"), take(f"{mlp}.up_proj.weight")]),
        down=take(f"{mlp}.down_proj.weight"),
        attn_norm=take("input_layernorm.weight"),
        mlp_norm=take("post_attention_layernorm.weight"),
        eps=config.rms_norm_eps,
        heads=config.num_heads,
        kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )


class _Layer:
    def __init__(self, weights: LayerWeights, fmt: WeightFormat, device: torch.device, dtype: torch.dtype):
        # quantized formats: the linears below serve prefill-sized batches in fp32, `decode` the rest
        dense_format: WeightFormat = "fp32" if fmt in QUANTIZED_FORMATS else fmt
        self.qkv: Linear = make_linear(weights.qkv, dense_format, device)  # [N, d] -> [N, q + 2 kv]
        self.o: Linear = make_linear(weights.o, dense_format, device)
        self.gate_up: Linear = make_linear(weights.gate_up, dense_format, device)  # [N, d] -> [N, 2 ffn]
        self.down: Linear = make_linear(weights.down, dense_format, device)
        # in the activations' dtype, as the final norm: mixed dtypes make rms_norm take its unfused path
        self.attn_norm = weights.attn_norm.to(device=device, dtype=dtype)
        self.mlp_norm = weights.mlp_norm.to(device=device, dtype=dtype)
        self.decode: QuantizedLayer | None = None
        if fmt in QUANTIZED_FORMATS:
            self.decode = QuantizedLayer(quantize_layer(weights, QUANTIZED_FORMATS[fmt]))

    def decode_weight_bytes(self) -> int:
        """Bytes of weights a decode step reads in this layer (matmuls in the format used, and the norms)."""
        norms = (self.attn_norm.numel() + self.mlp_norm.numel()) * self.attn_norm.element_size()
        if self.decode is not None:
            return self.decode.weight_bytes + norms
        return sum(linear.weight_bytes for linear in (self.qkv, self.o, self.gate_up, self.down)) + norms


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weight_format: WeightFormat = "fp32",
        decode_graph: bool = True,
    ) -> None:
        """`decode_graph`: on CPU, run decode steps as one onnxruntime graph (step_graph.py) in fp32 too (the
        quantized formats always do): ~2x faster decode, for a second copy of the weights in onnxruntime's
        packed layout (+0.56 GB resident for SmolLM2-135M; bench/NOTES.md)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.weight_format = weight_format
        embed = weights.get("model.embed_tokens.weight")
        if embed is None or embed.shape != (config.vocab_size, config.hidden_size):
            raise ModelLoadError(f"embedding weight missing or not [{config.vocab_size}, {config.hidden_size}]")
        self.embed = embed.to(device=self.device, dtype=dtype)  # [V, d]
        head = embed if config.tie_word_embeddings else weights.get("lm_head.weight")
        if head is None:
            raise ModelLoadError("the checkpoint lacks lm_head.weight and does not tie it to the embeddings")
        self.lm_head: Linear = make_linear(head, head_format(weight_format), self.device)
        self.final_norm = weights["model.norm.weight"].to(device=self.device, dtype=dtype)
        layer_weights = [_layer_weights(weights, f"model.layers.{i}", config) for i in range(config.num_layers)]
        self.layers = [_Layer(w, weight_format, self.device, dtype) for w in layer_weights]
        self.rope = RopeTable(config.rope, config.max_context, dtype, self.device)
        self.step: StepGraph | None = None  # decode steps as one graph (CPU: quantized formats, fp32 by choice)
        if weight_format in QUANTIZED_FORMATS:
            assert isinstance(self.lm_head, BlockQuantLinear)
            layers = [layer.decode.parts for layer in self.layers if layer.decode is not None]
            self.step = StepGraph(layers, self.final_norm, self.lm_head.quantized, self.rope)
        elif decode_graph and weight_format == "fp32" and self.device.type == "cpu":
            dense = [dense_layer(w) for w in layer_weights]
            self.step = StepGraph(dense, self.final_norm, DenseWeight(head.float().numpy()), self.rope)

    def new_cache(self, capacity: int = 64) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device, capacity=capacity
        )

    # -- a layer in two halves: the forward and the blend pass (blend.py) both run them ------------------
    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, D] for tokens at these positions (broadcast over heads)."""
        cos, sin = self.rope.lookup(positions.to(self.device))
        return cos[:, None, :], sin[:, None, :]

    def project_qkv(
        self, index: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exact: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, d] -> q [N, Hq, D], k [N, Hkv, D] (both rotated), v [N, Hkv, D] of layer `index`; `exact`
        keeps a quantized model's rows in fp32."""
        c, layer = self.config, self.layers[index]
        rotated = layer.decode is not None and h.shape[0] < DENSE_FROM_ROWS and not exact
        if rotated:
            qkv = layer.decode.project_qkv(h, cos[:, 0], sin[:, 0])  # RoPE inside the graph
        else:
            qkv = layer.qkv(F.rms_norm(h, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps))  # [N, q + 2 kv]
        q = qkv[:, : c.q_size].view(-1, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size : c.q_size + c.kv_size].view(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size :].view(-1, c.num_kv_heads, c.head_dim)
        if rotated:
            return q, k, v
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish_layer(self, index: int, h: torch.Tensor, attn: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """The rest of layer `index` after attention: output projection, residual, SwiGLU MLP. [N, d]."""
        c, layer = self.config, self.layers[index]
        if layer.decode is not None and h.shape[0] < DENSE_FROM_ROWS and not exact:
            return layer.decode.finish(h, attn)
        h = h + layer.o(attn)
        gate, up = layer.gate_up(F.rms_norm(h, (c.hidden_size,), layer.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        return h + layer.down(F.silu(gate) * up)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Run the batch's new tokens, append their KV to each chunk's cache; logits [M, V] for logit_rows."""
        c = self.config
        if int(batch.positions.max()) >= c.max_context or int(batch.positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {c.max_context}) (the model's context)")
        for chunk in batch.chunks:
            chunk.cache.reserve(chunk.num_tokens)
        if self.step is not None:
            return self._forward_with_step(batch)
        groups, rest = DecodeGroup.plan(batch.chunks)
        return self._forward(batch, groups, rest)

    def _forward_with_step(self, batch: ForwardBatch) -> torch.Tensor | None:
        """A forward with a step graph, in up to three passes by what each chunk is:
        - generated tokens (decodes, speculation trees) through the one-graph step (step_graph.py): per KV
          buffer one call for its decodes, then one call per tree;
        - prompt chunks in fp32 through torch: the prompt's KV is exact, whatever the batch holds (it goes to
          the prefix cache and to other agents), and prefill is compute-bound, so 4 bits buy nothing there;
        - anything else (a cache the step cannot take: no room, a shared prefix): in a quantized format
          through the layer graphs, as decode runs; in fp32 through torch, as prompts."""
        chunks = batch.chunks
        starts = list(accumulate((chunk.num_tokens for chunk in chunks), initial=0))  # each chunk's first row
        logits_by_row: dict[int, torch.Tensor] = {}
        assert self.step is not None
        calls, rest = self.step.plan(chunks)
        with decode_threads(1):
            for call in calls:
                logits_by_row |= self._step_call(batch, starts, call)
        prompts = [i for i in rest if chunks[i].prompt]
        others = [i for i in rest if i not in prompts]
        quantized = self.weight_format in QUANTIZED_FORMATS
        for indices, exact in ((prompts, True), (others, not quantized)):
            if indices:
                logits_by_row |= self._forward_part(batch, starts, indices, exact)
        if batch.logit_rows is None:
            return None
        with decode_threads(1):  # torch's second thread, woken here, would spin beside the next step's graph
            return torch.stack([logits_by_row[row] for row in batch.logit_rows.tolist()])  # [M, V]

    def _step_call(self, batch: ForwardBatch, starts: list[int], call: StepCall) -> dict[int, torch.Tensor]:
        """Run one step call; advance the caches it serves -> their rows' logits by the batch's row."""
        rows, tokens = len(call.lengths), call.tokens
        readers = [] if call.readers is None else call.readers.chunks
        # rows and tokens the call does not serve (pads) sit after what their row holds, seeing it all
        positions = call.lengths[:, None] + torch.arange(tokens)  # [B, S]
        bias = torch.zeros(rows, 1, tokens, int(call.lengths.max()) + tokens)  # [B, 1, S, T]
        h = torch.zeros(rows * tokens + len(readers), self.config.hidden_size, dtype=self.dtype)  # [B * S + G, d]
        served: dict[int, int] = {}  # the step's output row -> the batch's row
        for i, buffer_row in zip(call.chunks, call.buffer_rows, strict=True):
            chunk, first = batch.chunks[i], starts[i]
            n, length = chunk.num_tokens, chunk.cache.length
            h[buffer_row * tokens : buffer_row * tokens + n] = self.embed[batch.token_ids[first : first + n]]
            positions[buffer_row, :n] = batch.positions[first : first + n]
            if chunk.attn_mask is not None:  # [n, length + n], True = may attend
                bias[buffer_row, 0, :n, : length + n].masked_fill_(~chunk.attn_mask.cpu(), float("-inf"))
            served |= {buffer_row * tokens + j: first + j for j in range(n)}
        reader_rows = [starts[i] for i in readers]  # one token each
        h[rows * tokens :] = self.embed[batch.token_ids[reader_rows]]
        served |= {rows * tokens + g: row for g, row in enumerate(reader_rows)}
        logits = self.step(h, positions, bias, batch.positions[reader_rows], call)  # type: ignore[misc]
        for i in call.chunks + readers:
            batch.chunks[i].cache.length += batch.chunks[i].num_tokens
        wanted = set() if batch.logit_rows is None else set(batch.logit_rows.tolist())
        return {row: logits[out] for out, row in served.items() if row in wanted}

    def _forward_part(
        self, batch: ForwardBatch, starts: list[int], indices: list[int], exact: bool
    ) -> dict[int, torch.Tensor]:
        """Some of a batch's chunks as a forward of their own -> their logits by the batch's row."""
        rows = [row for i in indices for row in range(starts[i], starts[i + 1])]
        wanted = set() if batch.logit_rows is None else set(batch.logit_rows.tolist())
        part_rows = [j for j, row in enumerate(rows) if row in wanted]
        part = ForwardBatch(
            batch.token_ids[rows],
            batch.positions[rows],
            [batch.chunks[i] for i in indices],
            torch.tensor(part_rows, dtype=torch.long) if part_rows else None,
        )
        groups, rest = DecodeGroup.plan(part.chunks)
        with nullcontext() if exact else decode_threads(len(rows)):
            logits = self._forward(part, groups, rest, exact)
        return {} if logits is None else {rows[j]: row for j, row in zip(part_rows, logits, strict=True)}

    def _forward(
        self, batch: ForwardBatch, groups: list[DecodeGroup], rest: list[int], exact: bool = False
    ) -> torch.Tensor | None:
        c = self.config
        h = self.embed[batch.token_ids.to(self.device)]  # [N, d]
        cos, sin = self.rotary(batch.positions)
        for index in range(c.num_layers):
            q, k, v = self.project_qkv(index, h, cos, sin, exact)
            h = self.finish_layer(index, h, attend(index, batch.chunks, groups, rest, q, k, v), exact)
        for chunk in batch.chunks:
            chunk.cache.length += chunk.num_tokens
        if batch.logit_rows is None:
            return None
        last = F.rms_norm(h[batch.logit_rows.to(self.device)], (c.hidden_size,), self.final_norm, c.rms_norm_eps)
        head = self.lm_head.dense if exact and isinstance(self.lm_head, BlockQuantLinear) else self.lm_head
        return head(last).float()  # [M, V]
