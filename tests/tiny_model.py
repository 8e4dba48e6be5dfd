"""Small random-weight Llama models and model files for tests that need exact numerics, not language.

The weights come from kvmesh.bench.random_llama (shared with the CUDA check), at its O(1)-activation scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import pre_tokenizers

from kvmesh.bench.random_llama import random_llama_weights as random_llama_weights  # re-exported for tests
from kvmesh.kvcomm.rope import RopeSpec
from kvmesh.workers.model_config import ModelConfig

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_MERGES = ("h e", "Ġ t", "l l", "he ll")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        name="tiny-llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope=RopeSpec(head_dim=16, theta=10000.0),
        rms_norm_eps=1e-5,
        max_context=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def randomize_hf_model_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw a transformers model's weights at random_llama_weights' O(1) scale (HF's init is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (HF halves -> interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 256 byte symbols, a few merges, then the ChatML control tokens."""
    tokens = list(TINY_SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [merge.replace(" ", "") for merge in TINY_MERGES]
    types = [3] * len(TINY_SPECIAL_TOKENS) + [1] * (len(tokens) - len(TINY_SPECIAL_TOKENS))
    return tokens, list(TINY_MERGES), types


def write_tiny_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], arch: str = "llama") -> Path:
    """A llama.cpp-style GGUF (F32 tensors, Q/K rows permuted as the converter does) of a tiny model."""
    import gguf

    tokens, merges, types = tiny_vocab()
    if config.vocab_size != len(tokens):
        raise ValueError(f"tiny GGUF needs vocab_size {len(tokens)}")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(config.name)
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, tensor in weights.items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, suffix = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{names[suffix]}"
        if name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_heads)
        elif name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, config.num_kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
