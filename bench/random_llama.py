"""Random-weight Llama models: exact-numerics oracles for tests, and shapes no bundled model has for benches.

Weights are scaled so activations and logits are O(1) (std 1/sqrt(fan_in) for projections, N(0, 1)
embeddings): a wrong mask, position or permutation then moves the logits by far more than the tolerances.
The same weights go into kvmesh's LlamaModel and, under the same names, into transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from kvmesh.workers.model_config import ModelConfig


def random_llama_weights(
    config: ModelConfig,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Weights under HF Llama names; lm_head.weight only when the config does not tie it.

    Drawn where they will be used: a billion-parameter model drawn on a GPU takes milliseconds, on the
    CPU minutes. A CUDA generator draws a different stream than a CPU one with the same seed.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return draw(out_features, in_features) / in_features**0.5

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * draw(size)

    c = config
    weights = {"model.embed_tokens.weight": draw(c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = norm(c.hidden_size)
        weights[f"{p}.self_attn.q_proj.weight"] = linear(c.q_size, c.hidden_size)
        weights[f"{p}.self_attn.k_proj.weight"] = linear(c.kv_size, c.hidden_size)
        weights[f"{p}.self_attn.v_proj.weight"] = linear(c.kv_size, c.hidden_size)
        weights[f"{p}.self_attn.o_proj.weight"] = linear(c.hidden_size, c.q_size)
        weights[f"{p}.post_attention_layernorm.weight"] = norm(c.hidden_size)
        weights[f"{p}.mlp.gate_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        weights[f"{p}.mlp.up_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        weights[f"{p}.mlp.down_proj.weight"] = linear(c.hidden_size, c.intermediate_size)
    weights["model.norm.weight"] = norm(c.hidden_size)
    if not c.tie_word_embeddings:
        weights["lm_head.weight"] = linear(c.vocab_size, c.hidden_size)
    return weights


def hf_llama_config(config: ModelConfig) -> Any:
    """transformers' LlamaConfig for the same shape, RoPE (plain or llama3) and head tying."""
    import transformers

    rope = config.rope
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.scaling_factor is not None:
        rope_parameters.update(
            rope_type="llama3",
            factor=rope.scaling_factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position,
        )
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_context,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def hf_llama_from_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], *, device: torch.device | str, dtype: torch.dtype
) -> Any:
    """transformers' LlamaForCausalLM holding exactly these weights (cast to `dtype`), in eval mode.

    Built on `device` in `dtype` from the start: an 8B model built on the CPU in fp32 first would take
    32 GB and minutes of initialization that the weights then overwrite anyway.
    """
    import transformers

    with _default_dtype(dtype), torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_llama_config(config))
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"weights do not fit transformers' Llama: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()
