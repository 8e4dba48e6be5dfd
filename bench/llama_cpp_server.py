"""llama-cpp-python's OpenAI server over the same GGUF file, for `kvmesh bench serve`'s comparison column.

Optional: llama-cpp-python compiles llama.cpp when installed (~11 minutes of CPU), so it is no dependency of
kvmesh; the bench looks for it and says how to get it when it is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

MODEL_ALIAS = "smollm2"


def missing_note(*, server: bool = True) -> str | None:
    """None when llama-cpp-python (with its OpenAI server, if `server`) can run here, else why not and how to get it.

    `server=False` is for the in-process comparison (llama_cpp_engine), which needs the library alone.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        package = "'llama-cpp-python[server]'" if server else "llama-cpp-python"
        return (
            f"llama-cpp-python is not installed: `pip install {package}` (it compiles llama.cpp, "
            "~11 minutes of CPU) and run the bench again for this column"
        )
    if not server:
        return None
    if importlib.util.find_spec("llama_cpp.server") is None or importlib.util.find_spec("uvicorn") is None:
        return "llama-cpp-python is installed without its server: `pip install 'llama-cpp-python[server]'`"
    return None


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, threads: int, startup_timeout_s: float = 180.0) -> Iterator[str]:
    """Its OpenAI base URL on a free loopback port, serving `gguf` as MODEL_ALIAS; stopped at exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Its log goes to a file: llama.cpp logs the whole model load, and an undrained pipe fills and blocks it.
    # --interrupt_requests False: by default a new request cuts the stream being served short, so at
    # concurrency 8 all but one call came back empty (0 text events, no error) and "finished" early.
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", str(threads),
             "--interrupt_requests", "False"],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            yield _wait_until_serving(process, log, f"http://127.0.0.1:{port}/v1", startup_timeout_s)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_serving(process: subprocess.Popen[str], log: IO[str], base_url: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama-cpp-python's server exited: {log.read()[-500:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                if MODEL_ALIAS in {m["id"] for m in json.loads(response.read())["data"]}:
                    return base_url
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama-cpp-python's server did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)
