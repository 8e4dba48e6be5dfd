"""The KV cache of one token sequence: post-RoPE keys and values for every layer.

Layout: keys and values are each [layers, kv_heads, capacity, head_dim]; the first `length` slots hold
tokens. Slot i normally holds the token at position i (the exception is a speculation tree between its
verify forward and `keep`). Buffers grow by doubling so appends are amortized O(1).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np
import torch

from .rope import RopeSpec, shift_keys

_MIN_CAPACITY = 64


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = _MIN_CAPACITY,
    ) -> None:
        shape = (num_layers, num_kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """Wrap [L, H, T, D] tensors (copied into a fresh buffer)."""
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [L,H,T,D]")
        layers, heads, tokens, dim = keys.shape
        cache = cls(layers, heads, dim, dtype=keys.dtype, device=keys.device, capacity=tokens)
        cache.keys[:, :, :tokens] = keys
        cache.values[:, :, :tokens] = values
        cache.length = tokens
        return cache

    @classmethod
    def empty_like(cls, other: KVCache, capacity: int = _MIN_CAPACITY) -> KVCache:
        layers, heads, _, dim = other.keys.shape
        return cls(layers, heads, dim, dtype=other.dtype, device=other.keys.device, capacity=capacity)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def nbytes(self) -> int:
        """Bytes of the filled part (what a copy or transfer of this cache costs)."""
        return 2 * self.length * self.keys[:, :, 0].numel() * self.keys.element_size()

    def __len__(self) -> int:
        return self.length

    # -- growth and writes (used by the model forward) ----------------------------------------------
    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens after `length`."""
        needed = self.length + extra
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity, _MIN_CAPACITY)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty((old.shape[0], old.shape[1], new_capacity, old.shape[3]))
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [kv_heads, n, head_dim] into slots [start, start + n) of one layer."""
        end = start + keys.shape[1]
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's slots [0, end): ([kv_heads, end, D], [kv_heads, end, D])."""
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    # -- sequence operations --------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length} tokens")
        self.length = length

    def keep(self, start: int, slots: Sequence[int] | torch.Tensor) -> None:
        """Keep slots [0, start) plus the given slots (ascending, all >= start), packed after `start`.

        This is how a verified speculation tree is cut back to its accepted path.
        """
        index = torch.as_tensor(slots, dtype=torch.long, device=self.keys.device)
        kept = index.numel()
        self.keys[:, :, start : start + kept] = self.keys[:, :, index]
        self.values[:, :, start : start + kept] = self.values[:, :, index]
        self.length = start + kept

    def select(self, slots: Sequence[int] | torch.Tensor) -> KVCache:
        """A new cache holding the given slots, in the given order."""
        index = torch.as_tensor(slots, dtype=torch.long, device=self.keys.device)
        return KVCache.from_tensors(self.keys[:, :, index], self.values[:, :, index])

    def slice(self, start: int, end: int | None = None) -> KVCache:
        """A copy of slots [start, end)."""
        end = self.length if end is None else end
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"slice [{start}, {end}) is outside a {self.length}-token cache")
        return KVCache.from_tensors(self.keys[:, :, start:end], self.values[:, :, start:end])

    def window(self, start: int, end: int) -> KVCache:
        """Slots [start, end) as a cache of their own that shares this one's memory (writes land here); it
        is full (length end - start) and must not grow. Lets a caller assemble pieces in place."""
        if not 0 <= start <= end <= self.capacity:
            raise ValueError(f"window [{start}, {end}) is outside a cache of capacity {self.capacity}")
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[:, :, start:end], self.values[:, :, start:end]
        view.length = end - start
        return view

    def fill_from(self, other: KVCache) -> None:
        """Overwrite every slot with another cache of the same length (e.g. a window with its piece)."""
        if other.length != self.length:
            raise ValueError(f"cannot fill a {self.length}-token cache from a {other.length}-token one")
        self.keys[:, :, : self.length] = other.keys[:, :, : other.length]
        self.values[:, :, : self.length] = other.values[:, :, : other.length]

    def append(self, other: KVCache) -> None:
        """Concatenate another cache's tokens after ours (no re-rotation: place it first if needed)."""
        self.reserve(other.length)
        end = self.length + other.length
        self.keys[:, :, self.length : end] = other.keys[:, :, : other.length]
        self.values[:, :, self.length : end] = other.values[:, :, : other.length]
        self.length = end

    @staticmethod
    def concat(caches: Sequence[KVCache]) -> KVCache:
        if not caches:
            raise ValueError("concat needs at least one cache")
        total = sum(c.length for c in caches)
        out = KVCache.empty_like(caches[0], capacity=total)
        for cache in caches:
            out.append(cache)
        return out

    def shift(self, delta: int, rope: RopeSpec) -> None:
        """Move every token by `delta` positions: re-rotate the keys in place; values carry no position."""
        if delta:
            self.keys[:, :, : self.length] = shift_keys(self.keys[:, :, : self.length], delta, rope)

    def clone(self) -> KVCache:
        return self.slice(0)

    # -- bytes -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """msgpack of {dtype, shape, keys, values}; bf16 travels as its raw 16-bit pattern."""
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        return msgpack.packb(
            {
                "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(keys.shape),
                "keys": _tensor_bytes(keys),
                "values": _tensor_bytes(values),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> KVCache:
        record = msgpack.unpackb(data)
        dtype = getattr(torch, record["dtype"])
        shape = tuple(record["shape"])
        keys = _tensor_from_bytes(record["keys"], dtype, shape).to(device)
        values = _tensor_from_bytes(record["values"], dtype, shape).to(device)
        return cls.from_tensors(keys, values)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    numpy_dtype = torch.empty(0, dtype=storage_dtype).numpy().dtype
    tensor = torch.from_numpy(np.frombuffer(data, dtype=numpy_dtype).copy()).reshape(shape)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
