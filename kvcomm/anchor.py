"""An anchor: what one dense call taught about how a placeholder slot's KV deviates in its real context.

All tensors are position-normalized (keys rotated as if the segment started at position 0), so an
anchor recorded at one position corrects a segment placed at any other: a deviation in keys is itself a
rotated quantity, and the reference implementation's habit of adding it at the wrong rotation is a bug
we do not repeat.
"""

from __future__ import annotations

import math

import msgpack

from .kv_cache import KVCache, KVLayout, RecordInvalid, unpack_map


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
    def from_bytes(cls, data: bytes | memoryview, layout: KVLayout, device: str = "cpu") -> Anchor:
        """Decode a to_bytes record as the model's KV (`layout`); RecordInvalid if it does not fit."""
        record = unpack_map(data, "anchor record", ("id", "created", "signature", "delta", "next_text"))
        anchor_id, created, next_text = record["id"], record["created"], record["next_text"]
        if not isinstance(anchor_id, str) or type(created) not in (int, float):
            raise RecordInvalid(f"anchor record id {anchor_id!r} / created {created!r} are not a str and a number")
        anchor = cls(
            anchor_id,
            KVCache.from_bytes(record["signature"], layout.dtype, device),
            KVCache.from_bytes(record["delta"], layout.dtype, device),
            KVCache.from_bytes(next_text, layout.dtype, device) if next_text is not None else None,
            float(created),
        )
        anchor.check(layout)
        return anchor

    def check(self, layout: KVLayout) -> None:
        """Raise RecordInvalid unless every tensor is the model's KV for this anchor's tokens."""
        layout.check(self.delta, f"anchor {self.anchor_id} delta")
        layout.check(
            self.signature,
            f"anchor {self.anchor_id} signature",
            tokens=self.delta.length,
            layers=layout.signature_layers,
        )
        if self.next_text is not None:
            layout.check(self.next_text, f"anchor {self.anchor_id} next_text")
        if not math.isfinite(self.created):
            raise RecordInvalid(f"anchor {self.anchor_id} was created at {self.created}, not a time")
