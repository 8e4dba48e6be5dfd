"""One preallocated KV buffer shared by all running sequences, one slot each.

Keys and values are [layers, slots, kv_heads, capacity, head_dim]; a running sequence's KVCache is a
view of its slot. Because every slot lives in one tensor, a batched decode step writes the new keys of
all sequences with one indexed copy per layer and attends for all of them in one SDPA call (see
LlamaModel), instead of one small call per sequence. The buffer starts zeroed, because the batched
call reads (masked) positions past a sequence's length and a NaN there would poison its row; on CPU
it is zeroed by calloc, whose fresh pages materialize only where tokens are written, so a large
capacity costs address space, not memory.
A sequence that outgrows its slot moves to a buffer of its own and simply leaves the batched path.

A slot may hold a sequence whose first tokens are a shared prefix (shared_prefix.py): the prefix tree's KV,
read in place; the slot then holds only the tokens after it, at their own positions, and its first positions
stay unwritten. Whoever reads such a cache's KV as a whole goes through `slice`.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmesh.kvcomm.kv_cache import KVCache

from .shared_prefix import SharedPrefix


class SlotKVCache(KVCache):
    """A KVCache that is a view of a slot in KVSlots (until it outgrows it)."""

    def __init__(self, slots: KVSlots, index: int) -> None:  # a view: no allocation, no super().__init__
        self.keys = slots.keys[:, index]  # [L, H, capacity, D]
        self.values = slots.values[:, index]
        self.length = 0
        self.slots: KVSlots | None = slots
        self.index = index
        self.shared: SharedPrefix | None = None  # the tokens [0, shared.length), read in place

    def share(self, prefix: SharedPrefix) -> None:
        """Start the (empty) cache with a shared prefix: its tokens count as held, nothing is copied."""
        if self.length or self.shared is not None:
            raise RuntimeError("a shared prefix can only start an empty KV cache")
        self.shared, self.length = prefix, prefix.length

    def reserve(self, extra: int) -> None:
        if self.length + extra > self.capacity:
            self.unshare()  # the private buffer below is a copy of the slot: the prefix must be in it
            self.free_slot()  # KVCache.reserve now copies into a private, growable buffer
        super().reserve(extra)

    def unshare(self) -> None:
        """Copy the shared prefix into the slot's own positions and stop reading it in place."""
        if self.shared is not None:
            self.shared.copy_to(self.keys, self.values, 0, self.shared.length)
            self.shared = None

    def slice(self, start: int, end: int | None = None) -> KVCache:
        shared, end = self.shared, self.length if end is None else end
        if shared is None or start >= shared.length:
            return super().slice(start, end)
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"slice [{start}, {end}) is outside a {self.length}-token cache")
        out = KVCache.empty_like(self, capacity=end - start)
        middle = min(end, shared.length)
        shared.copy_to(out.keys, out.values, start, middle)
        out.keys[:, :, middle - start : end - start] = self.keys[:, :, middle:end]
        out.values[:, :, middle - start : end - start] = self.values[:, :, middle:end]
        out.length = end - start
        return out

    def free_slot(self) -> None:
        """Give the slot back (the view must not be written after this)."""
        if self.slots is not None:
            self.slots.release(self.index)
            self.slots = None
            self.shared = None


def shared_prefix(cache: KVCache) -> SharedPrefix | None:
    """The prefix `cache` reads in place, if any."""
    return cache.shared if isinstance(cache, SlotKVCache) else None


class KVSlots:
    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, capacity, head_dim)
        self.keys = _zeros(shape, dtype, device)
        self.values = _zeros(shape, dtype, device)
        self._free = list(range(num_slots))
        self._holders: dict[int, SlotKVCache] = {}

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def acquire(self) -> SlotKVCache | None:
        """The lowest free slot (keeps the used range compact for batched attention), or None if all are taken."""
        if not self._free:
            return None
        self._free.sort()
        cache = SlotKVCache(self, self._free.pop(0))
        self._holders[cache.index] = cache
        return cache

    def holder(self, index: int) -> SlotKVCache | None:
        """The cache that holds slot `index`, or None while it is free."""
        return self._holders.get(index)

    def release(self, index: int) -> None:
        if index in self._free:
            raise RuntimeError(f"KV slot {index} released twice")
        del self._holders[index]
        self._free.append(index)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # numpy's zeros is calloc: the kernel hands out zero pages lazily (torch.zeros would touch them all)
    bits = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}[dtype]
    return torch.from_numpy(np.zeros(shape, dtype=bits)).view(dtype)
