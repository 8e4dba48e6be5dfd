"""The KV store under attack and under pressure (real redis-server, no model): the private server's access
control and lifetime, sealed records, what a store refuses, and its byte bounds.

Planner-level consequences (a tampered entry never changes or fails a call) are in test_reuse_planner.py."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import redis
import torch

from kvmesh.kvcomm import embedded_redis
from kvmesh.kvcomm.anchor import Anchor
from kvmesh.kvcomm.embedded_redis import EmbeddedRedis
from kvmesh.kvcomm.kv_cache import KVCache, KVLayout, RecordInvalid
from kvmesh.kvcomm.record_seal import store_secret_for
from kvmesh.kvcomm.redis_store import RedisStore, redact_url
from kvmesh.kvcomm.store import MemoryStore, PoolConfig, StoredSegment, StoreError
from kvmesh.runtime.config import ConfigError, RuntimeConfig

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32, vocab_size=50, signature_layers=1)
SECRET = "test-secret-0123456789abcdef"


def kv(tokens: int, fill: float = 1.0, layers: int = 3, heads: int = 2, dtype: torch.dtype = torch.float32) -> KVCache:
    shape = (layers, heads, tokens, 4)
    return KVCache.from_tensors(torch.full(shape, fill, dtype=dtype), torch.full(shape, -fill, dtype=dtype))


def segment(tokens: int = 5, fill: float = 1.0) -> StoredSegment:
    return StoredSegment(list(range(tokens)), kv(tokens, fill))


def anchor(name: str, tokens: int = 5) -> Anchor:
    return Anchor(name, kv(tokens, layers=1), kv(tokens), kv(2), 1.0)


@pytest.fixture(scope="module")
def server():
    if shutil.which("redis-server") is None:
        pytest.fail(embedded_redis.INSTALL_HINT)  # the set-up installs it: its absence is a broken machine
    with EmbeddedRedis(max_memory_bytes=64 << 20) as running:
        yield running


@pytest.fixture
def store(server, request) -> RedisStore:
    return RedisStore(server.url, secret=SECRET, layout=LAYOUT, prefix=f"t-{request.node.name}")


def raw(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url)


# -- the private redis-server ------------------------------------------------------------------------------
def test_the_embedded_redis_refuses_clients_without_its_password(server):
    with socket.socket(socket.AF_UNIX) as sock:  # a bare client speaking the protocol: no password sent
        sock.connect(server.socket_path)
        sock.sendall(b"GET kvmesh:segment:x\r\n")
        assert sock.recv(200).startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=server.socket_path, password="guess").ping()
    assert raw(server).ping()


def test_the_embedded_redis_listens_on_no_tcp_port(server):
    assert raw(server).config_get("port") == {"port": "0"}
    sockets = set()
    for fd in os.listdir(f"/proc/{server.pid}/fd"):
        try:
            link = os.readlink(f"/proc/{server.pid}/fd/{fd}")
        except FileNotFoundError:  # a client connection closing meanwhile
            continue
        if link.startswith("socket:["):
            sockets.add(link[len("socket:[") : -1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # 0A: LISTEN
                listening.append(fields[1])
    assert sockets and listening == []  # it has sockets (the unix one), none of them a TCP listener


def test_the_socket_directory_is_private_and_the_password_on_no_command_line(server):
    password = redis.connection.parse_url(server.url)["password"]
    assert len(password) >= 32
    assert stat.S_IMODE(os.stat(os.path.dirname(server.socket_path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.config_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) & 0o077 == 0
    assert password in Path(server.config_path).read_text()  # where the server reads it: not its arguments
    command_lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command_lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert any(server.socket_path.encode() in line for line in command_lines)  # the scan does see the server
    assert not any(password.encode() in line for line in command_lines)
    assert password not in server.display_url


def test_maxmemory_evicts_the_least_recently_used_instead_of_failing_writes():
    with EmbeddedRedis(max_memory_bytes=4 << 20) as small:
        client = raw(small)
        assert client.config_get("maxmemory") == {"maxmemory": str(4 << 20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        store = RedisStore(small.url, layout=LAYOUT)
        for i in range(40):  # 40 x 256 KiB > 4 MiB: every write succeeds, the coldest keys go
            client.set(f"kvmesh:filler:{i}", os.urandom(256 << 10))
            assert store.put_segment(f"s{i}", segment()) is None
        kept = sum(client.exists(f"kvmesh:filler:{i}") for i in range(40))
        assert kept < 20 and client.exists("kvmesh:filler:39")


def test_the_server_outlives_the_thread_that_started_it():
    started: list[EmbeddedRedis] = []
    thread = threading.Thread(target=lambda: started.append(EmbeddedRedis()))
    thread.start()
    thread.join()
    server = started[0]
    try:
        time.sleep(0.5)  # the kernel's parent-death signal would have arrived by now
        assert raw(server).ping()
    finally:
        server.stop()


def test_the_server_dies_with_the_process_that_started_it():
    script = (
        "import sys, threading, time\n"
        "from kvmesh.kvcomm.embedded_redis import EmbeddedRedis\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(EmbeddedRedis())); t.start(); t.join()\n"
        "print(box[0].pid, box[0].socket_path, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, socket_path = parent.stdout.readline().split()
        pid = int(pid_text)
        assert _alive(pid)
    finally:
        parent.kill()  # SIGKILL: no exit handler runs, only the kernel can stop the server
        parent.wait()
    try:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
        with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
    finally:
        shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)  # a killed parent cleans nothing up


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- sealed records ------------------------------------------------------------------------------------
def test_a_record_with_flipped_bytes_is_dropped_warned_about_once_and_counted(store, caplog):
    key = f"{store._p}:segment:s"
    for name in ("s", "t"):
        store.put_segment(name, segment())
    reader = RedisStore(store.url, secret=SECRET, layout=LAYOUT, prefix=store._p)
    client = store._redis
    for name in ("s", "t"):
        blob = bytearray(client.get(f"{store._p}:segment:{name}"))
        blob[-3] ^= 0x40  # one bit of one value
        client.set(f"{store._p}:segment:{name}", bytes(blob))
    with caplog.at_level(logging.WARNING, logger="kvmesh.kvcomm.redis_store"):
        assert reader.get_segment("s") is None and reader.get_segment("t") is None
    rejections = reader.take_rejections()
    assert [(r.kind, r.key, r.fault, r.detail) for r in rejections] == [
        ("segment", "s", "tampered", "bad HMAC"),
        ("segment", "t", "tampered", "bad HMAC"),
    ]
    assert reader.rejected[("segment", "tampered")] == 2
    assert client.get(key) is None  # deleted: the next reader does not pay for it again
    warnings = [r for r in caplog.records if "dropped a tampered segment" in r.getMessage()]
    assert len(warnings) == 1 and SECRET not in warnings[0].getMessage()
    assert reader.take_rejections() == []


def test_records_written_without_the_secret_or_moved_to_another_key_do_not_verify(store):
    RedisStore(store.url, secret="another-secret-0123456789", layout=LAYOUT, prefix=store._p).put_segment(
        "forged", segment(fill=9.0)
    )
    store.put_segment("genuine", segment())
    client = store._redis
    client.set(f"{store._p}:segment:moved", client.get(f"{store._p}:segment:genuine"))
    client.set(f"{store._p}:segment:plain", StoredSegment([1, 2], kv(2)).to_bytes())  # unsealed
    reader = RedisStore(store.url, secret=SECRET, layout=LAYOUT, prefix=store._p)
    assert reader.get_segment("genuine") is not None
    for name in ("forged", "moved", "plain"):
        assert reader.get_segment(name) is None
    details = {r.key: r.detail for r in reader.take_rejections()}
    assert details == {"forged": "bad HMAC", "moved": "bad HMAC", "plain": "not a sealed kvmesh record"}


def test_an_anchor_listed_under_another_slot_does_not_verify_there(store):
    store.add_anchor("a", anchor("x"))
    store._redis.zadd(f"{store._p}:pool:b", {"x": 1.0})  # someone files it under slot b
    reader = RedisStore(store.url, secret=SECRET, layout=LAYOUT, prefix=store._p)
    assert reader.anchors("b") == []
    assert [(r.kind, r.key, r.detail) for r in reader.take_rejections()] == [("anchor", "x", "bad HMAC")]


def test_garbage_anchor_ids_are_skipped_and_removed_from_their_slot(store):
    store.add_anchor("s", anchor("good"))
    client = store._redis
    client.zadd(f"{store._p}:pool:s", {"junk": 0.5, "missing": 0.7, "bad\xff": 0.9})
    client.set(f"{store._p}:anchor:junk", msgpack.packb({"id": "junk"}))  # the 'next_text' KeyError of old
    reader = RedisStore(store.url, secret=SECRET, layout=LAYOUT, prefix=store._p)
    for _ in range(2):  # the bad ids fail no call, and are gone after the first
        assert [a.anchor_id for a in reader.anchors("s")] == ["good"]
    assert [(r.key, r.fault) for r in reader.take_rejections()] == [("junk", "tampered")]
    assert [m.decode() for m in client.zrange(f"{store._p}:pool:s", 0, -1)] == ["good"]
    assert client.get(f"{store._p}:anchor:junk") is None


# -- validation: records that verify but do not fit the model ---------------------------------------------
def sealed(store: RedisStore, name: str, payload: bytes) -> None:
    """Write a record as a holder of the secret would: it verifies, so only validation stands in the way."""
    key = f"{store._p}:segment:{name}"
    store._redis.set(key, store._sealer.seal(key, payload))


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        (StoredSegment([1, 2, 3], kv(3, layers=2)), "segment KV is float32 [2, 2, 3, 4]; the model's is float32 [3"),
        (StoredSegment([1, 2, 3], kv(3, heads=1)), "segment KV is float32 [3, 1, 3, 4]"),
        (StoredSegment([1, 2], kv(3)), "segment KV is float32 [3, 2, 3, 4]; the model's is float32 [3, 2, 2, 4]"),
        (StoredSegment([1, 2, 99], kv(3)), "token ids are not a list of token ids in [0, 50)"),
        (StoredSegment([1, 2, 3], kv(3, dtype=torch.float16)), "dtype 'float16'; the model's KV is float32"),
    ],
    ids=["layers", "heads", "length", "token-id", "dtype"],
)
def test_a_verified_record_that_does_not_fit_the_model_is_refused(store, bad, detail):
    sealed(store, "lie", bad.to_bytes())
    assert store.get_segment("lie") is None
    (rejection,) = store.take_rejections()
    assert rejection.fault == "malformed" and detail in rejection.detail
    assert store._redis.get(f"{store._p}:segment:lie") is None


def test_a_dtype_lie_is_refused_before_its_bytes_are_read(store):
    record = msgpack.unpackb(kv(4).to_bytes())
    record["dtype"], record["shape"] = "float64", [3, 2, 2, 4]  # the same bytes, read as float64: 2 tokens
    sealed(store, "f64", msgpack.packb({"token_ids": [1, 2], "kv": msgpack.packb(record)}))
    record["dtype"], record["shape"] = "float32", [3, 2, 4000, 4]  # a shape its bytes do not hold
    sealed(store, "huge", msgpack.packb({"token_ids": [1] * 4000, "kv": msgpack.packb(record)}))
    sealed(store, "junk", b"\x81\xa1a\x01garbage")  # msgpack with extra data: "unpack(b) received extra data"
    for name in ("f64", "huge", "junk"):
        assert store.get_segment(name) is None
    details = [r.detail for r in store.take_rejections()]
    assert "dtype 'float64'" in details[0] and "do not hold the 384000 bytes" in details[1]
    assert "does not decode (ExtraData" in details[2]


def test_a_verified_anchor_that_does_not_fit_is_refused(store):
    wrong = Anchor("w", kv(5, layers=2), kv(5), None, 1.0)  # a signature two layers deep: the model's has one
    key = f"{store._p}:anchor:w"
    store._redis.set(key, store._sealer.seal(f"{key}\x00s", wrong.to_bytes()))
    store._redis.zadd(f"{store._p}:pool:s", {"w": 1.0})
    assert store.anchors("s") == []
    (rejection,) = store.take_rejections()
    assert "anchor w signature is float32 [2, 2, 5, 4]; the model's is float32 [1, 2, 5, 4]" in rejection.detail


def test_the_memory_store_checks_what_it_is_given_against_the_model():
    memory = MemoryStore()
    memory.put_segment("unchecked", StoredSegment([1], kv(3)))  # no model bound yet: nothing to check against
    memory.bind_layout(LAYOUT)
    with pytest.raises(RecordInvalid, match="segment KV is float32 \\[3, 2, 3, 4\\]"):
        memory.put_segment("s", StoredSegment([1], kv(3)))
    with pytest.raises(RecordInvalid, match="anchor a delta"):
        memory.add_anchor("slot", Anchor("a", kv(5, layers=1), kv(5, heads=1), None, 1.0))
    with pytest.raises(ValueError, match="already holds KV of layout"):
        memory.bind_layout(KVLayout(3, 2, 4, torch.bfloat16, 50, 1))


def test_a_store_that_answers_errors_raises_store_error_and_bad_counters_count_as_zero(store):
    store.add_anchor("s", anchor("a"))
    store._redis.hset(f"{store._p}:uses:s", "a", "many")
    assert store.uses("s") == {"a": 0}
    store._redis.delete(f"{store._p}:pool:t")
    store._redis.set(f"{store._p}:pool:t", "not a sorted set")
    with pytest.raises(StoreError, match="WRONGTYPE"):
        store.anchors("t")


# -- bounds ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_segment_over_the_per_record_cap_is_not_stored_and_says_why(store, kind):
    config = PoolConfig(record_max_bytes=1 << 10)  # a 5-token segment of this layout is 480 bytes
    capped = MemoryStore(config) if kind == "memory" else RedisStore(store.url, config, layout=LAYOUT, prefix=store._p)
    assert capped.put_segment("small", segment(5)) is None
    why = capped.put_segment("large", segment(20))
    assert why == "3.8 KiB, over the per-record cap of 1.0 KiB (PoolConfig.record_max_bytes)"
    assert capped.get_segment("large") is None and capped.get_segment("small") is not None
    if kind == "redis":
        assert store._redis.exists(f"{store._p}:segment:large") == 0
    capped.add_anchor("s", anchor("huge", tokens=20))
    assert capped.anchors("s") == []


def test_the_segments_a_store_writes_stay_within_its_budget(store):
    one = segment().kv.nbytes()
    writer = RedisStore(store.url, PoolConfig(segment_budget_bytes=2 * one), layout=LAYOUT, prefix=store._p)
    for name in "abc":
        writer.put_segment(name, segment())
    assert [store._redis.exists(f"{store._p}:segment:{name}") for name in "abc"] == [0, 1, 1]  # its oldest went
    assert store._redis.ttl(f"{store._p}:segment:c") > 3000  # and the rest expire within the hour


# -- secrets and settings ----------------------------------------------------------------------------------------
def test_secrets_and_passwords_stay_out_of_urls_reprs_and_errors():
    assert redact_url("unix://:s3cret@/tmp/x/redis.sock?db=0") == "unix://:***@/tmp/x/redis.sock?db=0"
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    config = RuntimeConfig(redis_url="unix://:s3cret@/tmp/x/redis.sock?db=0", store_secret="k" * 32)
    assert "s3cret" not in repr(config) and "k" * 32 not in repr(config)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        RuntimeConfig(store_secret="short")
    store = RedisStore("unix://:s3cret@/nonexistent/redis.sock?db=0", layout=LAYOUT)
    with pytest.raises(StoreError) as failed:
        store.get_segment("x")
    assert "s3cret" not in str(failed.value) and "unreachable" in str(failed.value)


def test_the_session_secret_follows_the_deployment_token():
    assert store_secret_for("token-a") == store_secret_for("token-a") != store_secret_for("token-b")
    assert store_secret_for(None) != store_secret_for(None)  # no token: each session seals its own records
    assert "token-a" not in store_secret_for("token-a")
