"""How the engine serves a prompt beyond a plain (prefix-cached) prefill: what the reuse planner decided.

`splice_kv` holds the KV of prompt positions [splice_at, splice_at + len): the engine prefills up to
`splice_at` (from the prefix cache where it can), appends the spliced KV, and prefills the rest. Or
`splice_fn` computes it then, from the cache holding the exact prefix (a CacheBlend pass needs that
prefix): it extends the cache in place and returns (tokens added, of which recomputed). Spliced KV is
approximate, so nothing from `splice_at` on ever enters the exact prefix cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmesh.kvcomm.kv_cache import KVCache


@dataclass
class PromptReuse:
    use_prefix_cache: bool = True
    splice_at: int | None = None
    splice_kv: KVCache | None = None
    splice_fn: Callable[[KVCache], tuple[int, int]] | None = None
    splice_exact: int = 0  # leading spliced tokens whose KV is exact (a known prefix): reported as cached
    # called in the engine's thread: keep it short (copy what is needed, hand the rest to another thread);
    # read the cache through `slice`: its prefix may be shared, read in place, not in its own tensors
    on_prefilled: Callable[[KVCache], None] | None = None  # the whole prompt's KV is in the cache
    on_finished: Callable[[KVCache, list[int]], None] | None = None  # (cache, output ids), before it is freed

    @property
    def splice_pending(self) -> bool:
        return self.splice_kv is not None or self.splice_fn is not None

    def validate(self, prompt_length: int) -> None:
        both = self.splice_kv is not None and self.splice_fn is not None
        if (self.splice_at is None) != (not self.splice_pending) or both:
            raise ValueError("splice_at goes with exactly one of splice_kv and splice_fn")
        if self.splice_at is not None:
            end = self.splice_at + (self.splice_kv.length if self.splice_kv is not None else 0)
            if self.splice_at < 0 or end >= prompt_length:
                raise ValueError(
                    f"spliced KV [{self.splice_at}, {end}) must lie inside the prompt and leave its last token "
                    f"(of {prompt_length}) to compute"
                )
