"""Read a local Hugging Face Llama-family directory: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvmesh.kvcomm.rope import RopeSpec

from .model_config import ModelConfig, UnsupportedModelError
from .model_files import ModelLoadError, RawModel
from .tokenizer import Tokenizer

_SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def read_hf_dir(directory: Path) -> RawModel:
    config = _config(json.loads((directory / "config.json").read_text()), directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights (.bin checkpoints are not supported)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update({name: tensor.float() for name, tensor in load_file(str(file)).items()})
    if not (directory / "tokenizer.json").is_file():
        raise ModelLoadError(f"{directory} has no tokenizer.json")
    tokenizer = Tokenizer.from_hf_dir(directory, config.eos_token_ids)
    return RawModel(config=config, weights=weights, tokenizer=tokenizer)


def _config(raw: dict, directory: Path) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{directory} holds a {model_type!r} model; kvmesh runs Llama-family models "
            f"({', '.join(_SUPPORTED_MODEL_TYPES)})"
        )
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    # transformers < 5 writes rope_theta / rope_scaling at the top level; transformers >= 5 nests both
    # in rope_parameters ({"rope_type": ..., "rope_theta": ..., "factor": ...}).
    scaling = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("llama3", "default"):
        raise UnsupportedModelError(f"{directory}: rope scaling {scaling} is not supported (only 'llama3')")
    rope = RopeSpec(
        head_dim=head_dim,
        theta=float(scaling.get("rope_theta", raw.get("rope_theta", 10000.0))),
        scaling_factor=scaling.get("factor") if rope_type == "llama3" else None,
        low_freq_factor=scaling.get("low_freq_factor", 1.0),
        high_freq_factor=scaling.get("high_freq_factor", 4.0),
        original_max_position=scaling.get("original_max_position_embeddings", 8192),
    )
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    return ModelConfig(
        name=raw.get("_name_or_path") or directory.name,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=head_dim,
        rope=rope,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_context=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
