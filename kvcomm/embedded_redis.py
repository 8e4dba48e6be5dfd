"""A private redis-server for one run, on a free loopback port: the default when no Redis URL is given."""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
INSTALL_HINT = (
    "redis-server is not installed: install it (Debian/Ubuntu: apt-get install -y redis-server) "
    "or point kvmesh at an existing Redis with KVMESH_REDIS_URL=redis://host:port"
)


class EmbeddedRedis:
    def __init__(self, startup_timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.port = _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="kvmesh-redis-")
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._wait_ready(startup_timeout_s)
        log.info("kvmesh started a local redis-server at %s for this run", self.url)

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"redis-server exited at start (code {self._process.returncode}): {err.strip()}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

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


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, have the kernel stop redis-server when its parent dies, so a
    killed session (SIGKILL, SIGTERM) does not leave a server behind. Elsewhere, stop() is the only way."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
