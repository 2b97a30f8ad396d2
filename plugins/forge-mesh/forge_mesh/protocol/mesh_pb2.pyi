from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Caller(_message.Message):
    __slots__ = ("user_id", "roles", "kind", "claims_json", "expires_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    kind: str
    claims_json: bytes
    expires_at: float
    def __init__(self, user_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., kind: _Optional[str] = ..., claims_json: _Optional[bytes] = ..., expires_at: _Optional[float] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("function", "args_json", "caller", "request_id", "call_id", "target_node", "target_epoch", "timeout_ms", "protocol", "track_reads")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TRACK_READS_FIELD_NUMBER: _ClassVar[int]
    function: str
    args_json: bytes
    caller: Caller
    request_id: str
    call_id: str
    target_node: str
    target_epoch: str
    timeout_ms: int
    protocol: int
    track_reads: bool
    def __init__(self, function: _Optional[str] = ..., args_json: _Optional[bytes] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., request_id: _Optional[str] = ..., call_id: _Optional[str] = ..., target_node: _Optional[str] = ..., target_epoch: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., protocol: _Optional[int] = ..., track_reads: _Optional[bool] = ...) -> None: ...

class TableRead(_message.Message):
    __slots__ = ("table", "filters_json", "has_filters")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_FILTERS_FIELD_NUMBER: _ClassVar[int]
    table: str
    filters_json: bytes
    has_filters: bool
    def __init__(self, table: _Optional[str] = ..., filters_json: _Optional[bytes] = ..., has_filters: _Optional[bool] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message", "details_json", "not_started")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    NOT_STARTED_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    details_json: bytes
    not_started: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., details_json: _Optional[bytes] = ..., not_started: _Optional[bool] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("result_json", "error", "reads", "used_auth")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    USED_AUTH_FIELD_NUMBER: _ClassVar[int]
    result_json: bytes
    error: CallError
    reads: _containers.RepeatedCompositeFieldContainer[TableRead]
    used_auth: bool
    def __init__(self, result_json: _Optional[bytes] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., reads: _Optional[_Iterable[_Union[TableRead, _Mapping]]] = ..., used_auth: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("protocol", "target_node")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    target_node: str
    def __init__(self, protocol: _Optional[int] = ..., target_node: _Optional[str] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("node_id", "epoch", "protocol", "draining")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: str
    protocol: int
    draining: bool
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[str] = ..., protocol: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("protocol",)
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    def __init__(self, protocol: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "epoch", "protocol", "version", "activity_json")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_JSON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: str
    protocol: int
    version: str
    activity_json: bytes
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[str] = ..., protocol: _Optional[int] = ..., version: _Optional[str] = ..., activity_json: _Optional[bytes] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: str
    def __init__(self, level: _Optional[str] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("target_node", "target_epoch")
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPOCH_FIELD_NUMBER: _ClassVar[int]
    target_node: str
    target_epoch: str
    def __init__(self, target_node: _Optional[str] = ..., target_epoch: _Optional[str] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("accepted", "in_flight")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    in_flight: int
    def __init__(self, accepted: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "target_node")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    job_id: int
    target_node: str
    def __init__(self, job_id: _Optional[int] = ..., target_node: _Optional[str] = ...) -> None: ...

class CancelJobReply(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class CallFrame(_message.Message):
    __slots__ = ("seq", "request", "cancel")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    request: CallRequest
    cancel: bool
    def __init__(self, seq: _Optional[int] = ..., request: _Optional[_Union[CallRequest, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class CallResult(_message.Message):
    __slots__ = ("seq", "reply")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reply: CallReply
    def __init__(self, seq: _Optional[int] = ..., reply: _Optional[_Union[CallReply, _Mapping]] = ...) -> None: ...

class CallBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[CallFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[CallFrame, _Mapping]]] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CallResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CallResult, _Mapping]]] = ...) -> None: ...
