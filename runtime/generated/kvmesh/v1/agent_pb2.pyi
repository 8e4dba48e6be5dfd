from kvmesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("kind", "run_id", "phase", "final_phase", "source", "target", "text", "inputs", "wait_for", "deliver_to", "stream", "stats", "driver", "wall_s", "attempts")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        START: _ClassVar[Message.Kind]
        OUTPUT: _ClassVar[Message.Kind]
        TOKEN: _ClassVar[Message.Kind]
        ERROR: _ClassVar[Message.Kind]
        RETRY: _ClassVar[Message.Kind]
        CANCEL: _ClassVar[Message.Kind]
    START: Message.Kind
    OUTPUT: Message.Kind
    TOKEN: Message.Kind
    ERROR: Message.Kind
    RETRY: Message.Kind
    CANCEL: Message.Kind
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FINAL_PHASE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_FIELD_NUMBER: _ClassVar[int]
    DELIVER_TO_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    kind: Message.Kind
    run_id: str
    phase: int
    final_phase: bool
    source: str
    target: str
    text: str
    inputs: _containers.ScalarMap[str, str]
    wait_for: _containers.RepeatedScalarFieldContainer[str]
    deliver_to: _containers.RepeatedScalarFieldContainer[str]
    stream: bool
    stats: _worker_pb2.CallStats
    driver: str
    wall_s: float
    attempts: int
    def __init__(self, kind: _Optional[_Union[Message.Kind, str]] = ..., run_id: _Optional[str] = ..., phase: _Optional[int] = ..., final_phase: _Optional[bool] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., text: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ..., wait_for: _Optional[_Iterable[str]] = ..., deliver_to: _Optional[_Iterable[str]] = ..., stream: _Optional[bool] = ..., stats: _Optional[_Union[_worker_pb2.CallStats, _Mapping]] = ..., driver: _Optional[str] = ..., wall_s: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("name", "state", "calls", "last_error", "address", "waiting_runs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WAITING_RUNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    calls: int
    last_error: str
    address: str
    waiting_runs: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., calls: _Optional[int] = ..., last_error: _Optional[str] = ..., address: _Optional[str] = ..., waiting_runs: _Optional[int] = ...) -> None: ...
