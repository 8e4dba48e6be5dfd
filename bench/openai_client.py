"""A streamed chat completion as a benchmark client sees it: stdlib HTTP, server-sent events, timed.

No client library: what is timed is the server and the wire, the same for every OpenAI-compatible server the
bench compares (kvmesh serve, llama-cpp-python's). TTFT is from sending the request to the first event that
carries text.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class StreamedCall:
    text: str = ""
    ttft_s: float | None = None  # request sent -> first text
    total_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)
    text_events: int = 0  # events that carried text: one per generated token on a server that streams tokens
    kvmesh: dict[str, Any] | None = None  # kvmesh serve's figures (another server has none)
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        """The server's count, else the text events: llama-cpp-python's server streams one event per token
        and sends no usage (it ignores stream_options.include_usage)."""
        return int(self.usage.get("completion_tokens", self.text_events))


def stream_chat(
    base_url: str, payload: dict[str, Any], api_key: str | None = None, timeout_s: float = 600.0
) -> StreamedCall:
    """POST {base_url}/chat/completions with stream and include_usage; never raises (errors are recorded)."""
    url = urlsplit(base_url)
    body = json.dumps(payload | {"stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    call = StreamedCall()
    started = time.perf_counter()
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout_s)
    try:
        connection.request("POST", f"{url.path}/chat/completions", body, headers)
        response = connection.getresponse()
        if response.status != 200:
            call.error = f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}"
            return call
        pieces = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                call.error = chunk["error"].get("message", "error")
                break
            for choice in chunk.get("choices") or ():
                text = choice.get("delta", {}).get("content")
                if text:
                    call.text_events += 1
                    call.ttft_s = call.ttft_s if call.ttft_s is not None else time.perf_counter() - started
                    pieces.append(text)
            call.usage = chunk.get("usage") or call.usage
            call.kvmesh = chunk.get("kvmesh") or call.kvmesh
        call.text = "".join(pieces)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        call.error = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
        call.total_s = time.perf_counter() - started
    return call
