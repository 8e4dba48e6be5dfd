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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

MODEL_ALIAS = "smollm2"


def missing_note(*, server: bool = True) -> str | None:
    """None when llama-cpp-python (with its OpenAI server, if `server`) can run here, else why not and how to get it.

    `server=False` is for the in-process comparison (llama_cpp_engine), which needs the library alone.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        package = "'llama-cpp-python[server]'" if server else "llama-cpp-python"
        return (f"llama-cpp-python is not installed: `pip install {package}` (it compiles llama.cpp, "
                "~11 minutes of CPU) and run the bench again for this column")
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
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192", "--n_threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                said = process.stderr.read() if process.stderr else ""
                raise RuntimeError(f"llama-cpp-python's server exited: {said[-500:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                    if MODEL_ALIAS in {m["id"] for m in json.loads(response.read())["data"]}:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-cpp-python's server did not answer within {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
