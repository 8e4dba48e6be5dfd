"""An anchor: what one dense call taught about how a placeholder slot's KV deviates in its real context.

All tensors are position-normalized (keys rotated as if the segment started at position 0), so an
anchor recorded at one position corrects a segment placed at any other: a deviation in keys is itself a
rotated quantity, and the reference implementation's habit of adding it at the wrong rotation is a bug
we do not repeat.
"""

from __future__ import annotations

import msgpack

from .kv_cache import KVCache


class Anchor:
    """One observation for a slot (agent template x placeholder).

    signature: the segment's base values on a few layers, [S, H, T, D]: what matching compares.
    delta: real KV minus base KV of the segment's tokens, [L, H, T, D] keys and values (layer 0 is zero).
    next_text: the real KV of the template text right after the segment, or None if the segment ends the
      reusable span; reused as that text's KV in contexts that resemble this one.
    """

    def __init__(
        self, anchor_id: str, signature: KVCache, delta: KVCache, next_text: KVCache | None, created: float
    ) -> None:
        self.anchor_id = anchor_id
        self.signature = signature
        self.delta = delta
        self.next_text = next_text
        self.created = created

    @property
    def num_tokens(self) -> int:
        return self.delta.length

    def nbytes(self) -> int:
        extra = self.next_text.nbytes() if self.next_text is not None else 0
        return self.signature.nbytes() + self.delta.nbytes() + extra

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "id": self.anchor_id,
                "created": self.created,
                "signature": self.signature.to_bytes(),
                "delta": self.delta.to_bytes(),
                "next_text": self.next_text.to_bytes() if self.next_text is not None else None,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "cpu") -> Anchor:
        record = msgpack.unpackb(data)
        next_text = record["next_text"]
        return cls(
            record["id"],
            KVCache.from_bytes(record["signature"], device),
            KVCache.from_bytes(record["delta"], device),
            KVCache.from_bytes(next_text, device) if next_text is not None else None,
            record["created"],
        )
