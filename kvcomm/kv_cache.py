"""The KV cache of one token sequence: post-RoPE keys and values for every layer.

Layout: keys and values are each [layers, kv_heads, capacity, head_dim]; the first `length` slots hold
tokens. Slot i normally holds the token at position i (the exception is a speculation tree between its
verify forward and `keep`). Buffers grow by doubling so appends are amortized O(1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from .rope import RopeSpec, shift_keys

_MIN_CAPACITY = 64
_STORABLE = (torch.float32, torch.float16, torch.bfloat16)


class RecordInvalid(ValueError):
    """Stored bytes that do not decode, or decode to KV that does not fit the model: the entry is unusable."""

    fault = "malformed"


@dataclass(frozen=True)
class KVLayout:
    """What every stored KV of one model must look like. Records are decoded as `dtype` (never a dtype a
    record names) and must be [num_layers, num_kv_heads, n, head_dim] with n the entry's token count (an
    anchor's signature: signature_layers deep); token ids lie in [0, vocab_size)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    vocab_size: int
    signature_layers: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "signature_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVLayout.{name} must be an int >= 1, got {value!r}")
        if self.signature_layers > self.num_layers:
            raise ValueError(
                f"KVLayout.signature_layers ({self.signature_layers}) exceeds num_layers ({self.num_layers})"
            )
        if self.dtype not in _STORABLE:
            raise ValueError(f"KVLayout.dtype must be one of {', '.join(map(str, _STORABLE))}, got {self.dtype}")

    def check(self, kv: KVCache, what: str, *, tokens: int | None = None, layers: int | None = None) -> None:
        """Raise RecordInvalid unless `kv` is this model's KV: `layers` deep (default: every layer), `tokens`
        long when given."""
        depth = self.num_layers if layers is None else layers
        length = kv.length if tokens is None else tokens
        expected = [depth, self.num_kv_heads, length, self.head_dim]
        actual = [kv.num_layers, kv.keys.shape[1], kv.length, kv.keys.shape[3]]
        if kv.dtype != self.dtype or actual != expected:
            raise RecordInvalid(
                f"{what} is {_dtype_name(kv.dtype)} {actual}; the model's is {_dtype_name(self.dtype)} {expected}"
            )

    def check_tokens(self, token_ids: object, what: str) -> list[int]:
        """`token_ids` as a list of this model's token ids, or RecordInvalid."""
        if not isinstance(token_ids, list) or not all(
            type(t) is int and 0 <= t < self.vocab_size
            for t in token_ids  # bools are not token ids
        ):
            raise RecordInvalid(f"{what} are not a list of token ids in [0, {self.vocab_size})")
        return token_ids


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
                "dtype": _dtype_name(self.dtype),
                "shape": list(keys.shape),
                "keys": _tensor_bytes(keys),
                "values": _tensor_bytes(values),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
        """Decode a to_bytes record as `dtype`, the caller's (a record whose dtype differs is refused, never
        obeyed); its shape must account for its bytes exactly. Raises RecordInvalid saying what is wrong;
        the caller checks the shape against the model (KVLayout.check)."""
        record = unpack_map(data, "KV record", ("dtype", "shape", "keys", "values"))
        if record["dtype"] != _dtype_name(dtype):
            raise RecordInvalid(f"KV record of dtype {record['dtype']!r}; the model's KV is {_dtype_name(dtype)}")
        shape = record["shape"]
        if not (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int and n >= 0 for n in shape)):
            raise RecordInvalid(f"KV record shape {shape!r} is not [layers, kv_heads, tokens, head_dim]")
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        for name in ("keys", "values"):
            if not isinstance(record[name], bytes) or len(record[name]) != size:
                raise RecordInvalid(f"KV record {name} do not hold the {size} bytes its shape {shape} needs")
        keys = _tensor_from_bytes(record["keys"], dtype, tuple(shape)).to(device)
        values = _tensor_from_bytes(record["values"], dtype, tuple(shape)).to(device)
        return cls.from_tensors(keys, values)


def unpack_map(data: bytes | memoryview, what: str, fields: Sequence[str]) -> dict[str, Any]:
    """A msgpack map holding at least `fields`, or RecordInvalid (stored bytes are not trusted to be one)."""
    try:
        record = msgpack.unpackb(data)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:  # ExtraData, FormatError, bad UTF-8, ...
        raise RecordInvalid(f"{what} does not decode ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise RecordInvalid(f"{what} is a {type(record).__name__}, not a map")
    missing = [name for name in fields if name not in record]
    if missing:
        raise RecordInvalid(f"{what} lacks {', '.join(missing)}")
    return record


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
