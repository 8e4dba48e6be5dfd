"""Rotary position embedding with float64 angles.

Keys are cached post-RoPE, so moving a cached key from position p to p + Δ is one more rotation by Δ
(rotations compose additively). Angles are always computed in float64 and cast afterwards: fp32 angles
drift by ~4e-4 at position 8000, which would make a moved key differ from one computed in place.
The channel layout is HF's "rotate_half" (first half / second half of each head are the pair members).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    theta: float
    # Llama-3 style frequency scaling ("rope_type": "llama3"); None means plain RoPE.
    scaling_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"RoPE head_dim must be a positive even number, got {self.head_dim}")
        if self.theta <= 0:
            raise ValueError(f"RoPE theta must be positive, got {self.theta}")

    def inv_freq(self) -> torch.Tensor:
        """[head_dim / 2] float64 inverse frequencies."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv = 1.0 / (self.theta**exponents)
        if self.scaling_factor is None:
            return inv
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv / self.scaling_factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        blended = (1 - smooth) * inv / self.scaling_factor + smooth * inv
        return torch.where(mid, blended, scaled)


def cos_sin(spec: RopeSpec, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [len(positions), head_dim] for arbitrary (even negative) integer positions."""
    angles = positions.to(torch.float64)[:, None] * spec.inv_freq().to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE. x: [..., T, D]; cos/sin broadcastable to it ([T, D] for per-token angles)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def shift_keys(keys: torch.Tensor, delta: int, spec: RopeSpec) -> torch.Tensor:
    """Move post-RoPE keys [..., T, D] by `delta` positions (every token by the same amount)."""
    if delta == 0:
        return keys
    cos, sin = cos_sin(spec, torch.tensor([delta], device=keys.device), keys.dtype)
    return rotate(keys, cos, sin)


class RopeTable:
    """Precomputed cos/sin for positions [0, max_positions), looked up per forward."""

    def __init__(self, spec: RopeSpec, max_positions: int, dtype: torch.dtype, device: torch.device) -> None:
        self.spec = spec
        self.max_positions = max_positions
        self.cos, self.sin = cos_sin(spec, torch.arange(max_positions, device=device), dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] positions -> cos, sin [N, head_dim]."""
        return self.cos[positions], self.sin[positions]
