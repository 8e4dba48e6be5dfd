"""Sampling parameters and the sampler: greedy, or temperature + top-p with a per-request seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_limits import GREEDY_BELOW, check_sampling
from .sampling_limits import InvalidRequestError as InvalidRequestError  # its home for the engine's callers


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is a common slip: treat it as one stop string
            object.__setattr__(self, "stop", (self.stop,))
        check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed, self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / T), restricted to the top-p nucleus.

    logits [..., V] -> probs [..., V] (float32). Greedy requests get a one-hot on the argmax.
    """
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    if not torch.isfinite(top).all():  # NaN or inf logits: there is no distribution to draw from
        raise RuntimeError("the model's logits are not finite (NaN or inf): this request cannot be sampled")
    # the max subtracted first, (logits - max) / T <= 0: no overflow however small T is
    probs = torch.softmax((logits - top) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the line stays in)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator
