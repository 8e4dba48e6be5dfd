"""Stored records carry an HMAC: bytes read back from a store are used only if a holder of the session's
secret wrote them under that very key.

A sealed record is MAGIC + HMAC-SHA256(secret, context, payload) + payload, the context being the record's
key (for an anchor, its key and its slot): a record copied to another key or slot does not verify. The
secret travels to a session's workers in RuntimeConfig.store_secret, like the gRPC token: set
KVMESH_STORE_SECRET, or it is derived from KVMESH_TOKEN (sessions sharing a token share their pool),
else each session makes its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .kv_cache import RecordInvalid

MAGIC = b"kvm1"
_HEADER = len(MAGIC) + hashlib.sha256().digest_size
_MIN_SECRET_BYTES = 16


class RecordTampered(RecordInvalid):
    """A record whose HMAC does not verify: written by someone without the secret, or moved from its key."""

    fault = "tampered"


class Sealer:
    def __init__(self, secret: str | bytes) -> None:
        self._key = check_secret(secret)

    def seal(self, context: str, payload: bytes) -> bytes:
        return MAGIC + self._mac(context, payload) + payload

    def open(self, context: str, blob: bytes) -> memoryview:
        """The payload of a record sealed for `context` (a view: segments run to hundreds of MB), or
        RecordTampered."""
        view = memoryview(blob)
        if len(view) < _HEADER or view[: len(MAGIC)] != MAGIC:
            raise RecordTampered("not a sealed kvmesh record")
        payload = view[_HEADER:]
        if not hmac.compare_digest(bytes(view[len(MAGIC) : _HEADER]), self._mac(context, payload)):
            raise RecordTampered("bad HMAC")
        return payload

    def _mac(self, context: str, payload: bytes | memoryview) -> bytes:
        name = context.encode()
        mac = hmac.new(self._key, len(name).to_bytes(4, "big") + name, hashlib.sha256)  # length-prefixed: unambiguous
        mac.update(payload)
        return mac.digest()


def check_secret(secret: str | bytes) -> bytes:
    """The secret as an HMAC key, or ValueError if it is too short to be one."""
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < _MIN_SECRET_BYTES:
        raise ValueError(
            f"a KV store secret needs at least {_MIN_SECRET_BYTES} bytes (KVMESH_STORE_SECRET / "
            "RuntimeConfig.store_secret): make one with `openssl rand -hex 32`"
        )
    return key


def store_secret_for(token: str | None) -> str:
    """A session's store secret when none is configured: derived from the deployment's token (every session
    sharing the token then reads the others' records), else a fresh one (the session's records are its own)."""
    if token:
        return hmac.new(token.encode(), b"kvmesh KV store records v1", hashlib.sha256).hexdigest()
    return secrets.token_hex(32)
