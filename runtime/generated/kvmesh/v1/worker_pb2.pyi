from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReuseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REUSE_MODE_UNSPECIFIED: _ClassVar[ReuseMode]
    REUSE_MODE_DENSE: _ClassVar[ReuseMode]
    REUSE_MODE_PREFIX: _ClassVar[ReuseMode]
    REUSE_MODE_KVCOMM: _ClassVar[ReuseMode]
    REUSE_MODE_BLEND: _ClassVar[ReuseMode]
    REUSE_MODE_NAIVE: _ClassVar[ReuseMode]
    REUSE_MODE_KVCOMM_BLEND: _ClassVar[ReuseMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
REUSE_MODE_UNSPECIFIED: ReuseMode
REUSE_MODE_DENSE: ReuseMode
REUSE_MODE_PREFIX: ReuseMode
REUSE_MODE_KVCOMM: ReuseMode
REUSE_MODE_BLEND: ReuseMode
REUSE_MODE_NAIVE: ReuseMode
REUSE_MODE_KVCOMM_BLEND: ReuseMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class Segment(_message.Message):
    __slots__ = ("id", "producer", "placeholder", "text", "holder")
    ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    id: str
    producer: str
    placeholder: str
    text: str
    holder: str
    def __init__(self, id: _Optional[str] = ..., producer: _Optional[str] = ..., placeholder: _Optional[str] = ..., text: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class PromptPart(_message.Message):
    __slots__ = ("text", "segment")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    text: str
    segment: Segment
    def __init__(self, text: _Optional[str] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "parts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    parts: _containers.RepeatedCompositeFieldContainer[PromptPart]
    def __init__(self, role: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[PromptPart, _Mapping]]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "agent", "system", "parts", "sampling", "reuse", "workflow", "messages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REUSE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    agent: str
    system: str
    parts: _containers.RepeatedCompositeFieldContainer[PromptPart]
    sampling: Sampling
    reuse: ReuseMode
    workflow: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, request_id: _Optional[str] = ..., agent: _Optional[str] = ..., system: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[PromptPart, _Mapping]]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., reuse: _Optional[_Union[ReuseMode, str]] = ..., workflow: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class CallStats(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "reused_tokens", "recomputed_tokens", "output_tokens", "ttft_s", "decode_tok_s", "drafted_tokens", "accepted_tokens", "reuse_mode", "model", "worker", "anchors_consulted", "segment_modes", "segment_reasons", "degradations")
    class SegmentModesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ReuseMode
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ReuseMode, str]] = ...) -> None: ...
    class SegmentReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSE_MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_CONSULTED_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_MODES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    output_tokens: int
    ttft_s: float
    decode_tok_s: float
    drafted_tokens: int
    accepted_tokens: int
    reuse_mode: ReuseMode
    model: str
    worker: str
    anchors_consulted: int
    segment_modes: _containers.ScalarMap[str, ReuseMode]
    segment_reasons: _containers.ScalarMap[str, str]
    degradations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ..., recomputed_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., decode_tok_s: _Optional[float] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., reuse_mode: _Optional[_Union[ReuseMode, str]] = ..., model: _Optional[str] = ..., worker: _Optional[str] = ..., anchors_consulted: _Optional[int] = ..., segment_modes: _Optional[_Mapping[str, ReuseMode]] = ..., segment_reasons: _Optional[_Mapping[str, str]] = ..., degradations: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finished", "finish_reason", "stats")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: FinishReason
    stats: CallStats
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[CallStats, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("model", "address", "running", "waiting", "requests_total", "prefix_cache_bytes", "threads", "device", "weights")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    address: str
    running: int
    waiting: int
    requests_total: int
    prefix_cache_bytes: int
    threads: int
    device: str
    weights: str
    def __init__(self, model: _Optional[str] = ..., address: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., requests_total: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., device: _Optional[str] = ..., weights: _Optional[str] = ...) -> None: ...
