"""The OpenAI chat-completions schema as this server speaks it: pydantic models, and what it refuses.

Every field of OpenAI's request is known here. One the server honours is a typed field; one it cannot honour
(tools, n > 1, logprobs, penalties, …) is accepted only at its neutral value (null, false, 0, [], n = 1: it
asks for nothing) and is otherwise a 400 that names it; a field OpenAI does not know is a 400 too, as OpenAI
answers. `kvmesh` is this server's own extension: `{"reuse": "dense"}` picks the reuse mode of one request.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvmesh.workers.vocabulary import ReuseMode
from kvmesh.workers.worker import CallStats

from .openai_errors import OpenAIError, unsupported

MAX_UINT32 = 2**32 - 1  # the wire's Sampling.max_tokens
MAX_UINT64 = 2**64 - 1  # the wire's Sampling.seed

# request fields this server does not implement -> the values that ask for nothing (null always does)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),  # only means something with tools
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": ({},),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}
_MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tool_calls": ([],),
    "function_call": (),
    "refusal": (),
    "audio": (),
    "name": (),  # the chat template has no place for a participant's name
}
_ROLES = ("system", "developer", "user", "assistant")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other message fields: checked against _MESSAGE_NEUTRAL
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, where: str) -> str:
        """The content as one text: text parts joined by newlines; any other part is refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for index, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text":
                raise unsupported(
                    f"{where}.content[{index}]",
                    f"content parts of type {kind!r} are not supported "
                    "(this model reads text only); send {'type': 'text', 'text': ...}",
                )
            try:
                texts.append(TextPart.model_validate(part).text)
            except ValidationError as exc:
                raise _invalid(exc, f"{where}.content[{index}]") from None
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad here


class KvmeshOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reuse: ReuseMode | None = None  # None: auto


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields: checked against _NEUTRAL
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_UINT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_UINT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None  # names the slot whose anchors apply (else user, else the system prompt)
    safety_identifier: str | None = None  # OpenAI's successor of `user`: names the slot alike
    kvmesh: KvmeshOptions | None = None

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The request body, validated; OpenAIError(400) naming what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    _refuse_unsupported(request.model_extra or {}, _NEUTRAL, "")
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        if message.role not in _ROLES:
            hint = (
                " (tool calls are not supported: send a tool's result as user content)"
                if message.role in ("tool", "function")
                else ""
            )
            raise OpenAIError(
                400, f"{where}.role is {message.role!r}; use one of {', '.join(_ROLES)}{hint}", param=f"{where}.role"
            )
        _refuse_unsupported(message.model_extra or {}, _MESSAGE_NEUTRAL, f"{where}.")
    if request.max_tokens and request.max_completion_tokens and request.max_tokens != request.max_completion_tokens:
        raise OpenAIError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    if any(not stop for stop in request.stop_strings):
        raise OpenAIError(400, "stop strings must be non-empty", param="stop")
    return request


def _refuse_unsupported(extra: dict[str, Any], neutral: dict[str, tuple[Any, ...]], prefix: str) -> None:
    for name, value in extra.items():
        if name not in neutral:
            raise OpenAIError(
                400,
                f"Unrecognized request argument supplied: {prefix}{name}",
                param=f"{prefix}{name}",
                code="unknown_parameter",
            )
        if value is not None and value not in neutral[name]:
            allowed = " or ".join(json.dumps(v) for v in (None, *neutral[name]))
            raise unsupported(
                f"{prefix}{name}", f"{json.dumps(value)[:80]} is not supported by this server (only {allowed})"
            )


def _invalid(exc: ValidationError, prefix: str = "") -> OpenAIError:
    error = exc.errors()[0]
    param = prefix + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    param = param.lstrip(".")
    return OpenAIError(400, f"{param}: {error['msg']}", param=param)


# -- responses ---------------------------------------------------------------------------------------------


class KvmeshStats(BaseModel):
    """Where the prompt's KV came from, as the worker reports it: a view of the call's CallStats (`of`)."""

    reused_tokens: int
    cached_tokens: int  # the exact prefix cache's share (usage.prompt_tokens_details.cached_tokens adds reused)
    reuse_mode: str
    segment_modes: dict[str, str]
    segment_reasons: dict[str, str]
    degradations: list[str]
    slot: str  # whose anchors applied, and the producer of the reply's segment
    worker: str
    ttft_s: float  # measured by the worker: from the request's arrival there to its first token

    @classmethod
    def of(cls, stats: CallStats, slot: str) -> KvmeshStats:
        return cls(
            reused_tokens=stats.reused_tokens,
            cached_tokens=stats.cached_tokens,
            reuse_mode=stats.reuse_mode,
            segment_modes=stats.segment_modes,
            segment_reasons=stats.segment_reasons,
            degradations=list(stats.degradations),
            slot=slot,
            worker=stats.worker,
            ttft_s=stats.ttft_s,
        )


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, stats: CallStats) -> Usage:
        return cls(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.output_tokens,
            total_tokens=stats.prompt_tokens + stats.output_tokens,
            # OpenAI's meaning: prompt tokens whose KV was not computed for this call (the prefix cache's and
            # the segments' reused KV alike); `kvmesh` tells them apart
            prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens + stats.reused_tokens),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class _Completion(BaseModel):
    """What every completion and chunk of one call says alike."""

    id: str
    created: int
    model: str


class ChatCompletion(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage
    kvmesh: KvmeshStats


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None
    kvmesh: KvmeshStats | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvmesh"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
