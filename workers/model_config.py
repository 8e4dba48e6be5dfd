"""The shape of a Llama-family model, read from GGUF metadata or an HF config.json."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.kvcomm.rope import RopeSpec

SUPPORTED_ARCHITECTURES = ("llama",)


class UnsupportedModelError(ValueError):
    """The model file is readable but describes something this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    rms_norm_eps: float
    max_context: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_context",
        ):
            if getattr(self, field) <= 0:
                raise UnsupportedModelError(f"model config field {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope.head_dim != self.head_dim:
            raise UnsupportedModelError(f"RoPE covers {self.rope.head_dim} dims but heads have {self.head_dim}")
        if not self.eos_token_ids:
            raise UnsupportedModelError("the model declares no end-of-sequence token")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, element_size: int = 4) -> int:
        return 2 * self.num_layers * self.kv_size * element_size
