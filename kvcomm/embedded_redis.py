"""A private redis-server for one run: the default when no Redis URL is given.

Only this process's user can reach it, and only with its password: it listens on a unix socket (no TCP
port) in a fresh 0700 directory, and the password is in a 0600 config file there, never on a command line
(`ps` shows every user a process's arguments). `maxmemory` with allkeys-lru bounds it: the least recently
used anchors and segments are evicted rather than writes failing (the stores treat a missing entry as a
miss). The server dies with this process, whichever thread started it (see _Launcher).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any

import redis

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_Request = tuple[list[str], dict[str, Any], "Future[subprocess.Popen[bytes]]"]
INSTALL_HINT = (
    "redis-server is not installed: install it (Debian/Ubuntu: apt-get install -y redis-server) "
    "or point kvmesh at an existing Redis with KVMESH_REDIS_URL=redis://host:port"
)


class EmbeddedRedis:
    def __init__(self, max_memory_bytes: int = 1 << 30, startup_timeout_s: float = 10.0) -> None:
        """max_memory_bytes: the server's maxmemory; past it, the least recently used keys are evicted."""
        if not isinstance(max_memory_bytes, int) or max_memory_bytes < 1 << 20:
            raise ValueError(f"EmbeddedRedis max_memory_bytes must be an int >= 1 MiB, got {max_memory_bytes!r}")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._dir = tempfile.TemporaryDirectory(prefix="kvmesh-redis-")  # mkdtemp: 0700, this user only
        self.socket_path = os.path.join(self._dir.name, "redis.sock")
        password = secrets.token_hex(32)  # hex: safe in the URL and the config file as it is
        self.config_path = os.path.join(self._dir.name, "redis.conf")
        _write_private(self.config_path, _config(self._dir.name, self.socket_path, password, max_memory_bytes))
        try:
            argv = [binary, self.config_path]
            self._process = _LAUNCHER.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError:
            self._dir.cleanup()
            raise
        self.url = f"unix://:{password}@{self.socket_path}?db=0"  # carries the password: never log it
        self._wait_ready(password, startup_timeout_s)
        log.info("kvmesh started a local redis-server at %s for this run", self.display_url)

    @property
    def display_url(self) -> str:
        """Where the server listens, without its password: what may be printed."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_ready(self, password: str, timeout_s: float) -> None:
        client = redis.Redis(unix_socket_path=self.socket_path, password=password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                self._dir.cleanup()
                raise RuntimeError(f"redis-server exited at start (code {self._process.returncode}): {err.strip()}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.socket_path} within {timeout_s} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _config(directory: str, socket_path: str, password: str, max_memory_bytes: int) -> str:
    for path in (directory, socket_path):
        if any(c in path for c in '"\\\n'):  # the config file quotes paths; TMPDIR would have to be odd
            raise RuntimeError(f"cannot start redis-server in {directory!r}: set TMPDIR to a plain path")
    return "\n".join(
        [
            "port 0",  # no TCP listener at all
            f'unixsocket "{socket_path}"',
            "unixsocketperm 700",
            f"requirepass {password}",
            "protected-mode yes",
            f"maxmemory {max_memory_bytes}",
            "maxmemory-policy allkeys-lru",  # anchors and segments are caches: evict the coldest, never refuse writes
            'save ""',
            "appendonly no",
            f'dir "{directory}"',
            "loglevel warning",
            "",
        ]
    )


def _write_private(path: str, text: str) -> None:
    """Create `path` readable by this user only (0600 from the start: no window where others could read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


class _Launcher:
    """Starts child processes from one thread that lives as long as the process.

    Linux's PR_SET_PDEATHSIG signals the child when the *thread* that forked it exits, not the process: a
    server started from a short-lived thread (a session created in a worker thread) would die with that
    thread. Forked from this thread instead, the server gets SIGTERM exactly when the process ends (exit,
    SIGKILL, crash). A process forked from this one starts its own launcher thread (threads do not survive
    a fork).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._requests = os.getpid(), queue.SimpleQueue()
                serve = threading.Thread(target=self._serve, args=(self._requests,), name="kvmesh-launcher")
                serve.daemon = True  # it waits for requests until the process ends
                serve.start()
            done: Future[subprocess.Popen[bytes]] = Future()
            self._requests.put((argv, kwargs, done))
        return done.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue[_Request]) -> None:
        prctl = _prctl()
        parent = os.getpid()
        while True:
            argv, kwargs, done = requests.get()
            try:
                done.set_result(subprocess.Popen(argv, preexec_fn=lambda: _die_with(parent, prctl), **kwargs))
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)


def _prctl() -> Any:
    """libc's prctl, looked up before any fork (a child between fork and exec must not load libraries)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() is the only way the server goes


def _die_with(parent: int, prctl: Any) -> None:
    """In the child, before exec: SIGTERM when the launcher thread (hence the process) dies. If the process
    died before this ran, the signal will never come: exit now."""
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


_LAUNCHER = _Launcher()
