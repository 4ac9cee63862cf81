from google.protobuf import any_pb2 as _any_pb2
from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special_tokens", "parse_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARSE_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special_tokens: bool
    parse_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ..., parse_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeStreamRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TokenizeItem]
    def __init__(self, items: _Optional[_Iterable[_Union[TokenizeItem, _Mapping]]] = ...) -> None: ...

class TokenizeItem(_message.Message):
    __slots__ = ("item_id", "request")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    request: TokenizeRequest
    def __init__(self, item_id: _Optional[int] = ..., request: _Optional[_Union[TokenizeRequest, _Mapping]] = ...) -> None: ...

class TokenizeStreamResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenizeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenizeResult, _Mapping]]] = ...) -> None: ...

class TokenizeResult(_message.Message):
    __slots__ = ("item_id", "token_ids", "error_code", "error_message", "error_details")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAILS_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    error_code: int
    error_message: str
    error_details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, item_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., error_details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("token_ids", "skip_special_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_special_tokens: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ApplyChatTemplateRequest(_message.Message):
    __slots__ = ("messages", "add_generation_prompt", "tools_json", "tokenize", "template_kwargs_json")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    add_generation_prompt: bool
    tools_json: _containers.RepeatedScalarFieldContainer[str]
    tokenize: bool
    template_kwargs_json: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., tools_json: _Optional[_Iterable[str]] = ..., tokenize: _Optional[bool] = ..., template_kwargs_json: _Optional[str] = ...) -> None: ...

class ApplyChatTemplateResponse(_message.Message):
    __slots__ = ("prompt", "token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeStreamStart(_message.Message):
    __slots__ = ("prompt_token_ids", "stop", "include_stop_string", "skip_special_tokens")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    include_stop_string: bool
    skip_special_tokens: bool
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., include_stop_string: _Optional[bool] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokenizeStreamRequest(_message.Message):
    __slots__ = ("start", "tokens", "finish")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    start: DetokenizeStreamStart
    tokens: _common_pb2.TokenIds
    finish: bool
    def __init__(self, start: _Optional[_Union[DetokenizeStreamStart, _Mapping]] = ..., tokens: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., finish: _Optional[bool] = ...) -> None: ...

class DetokenizeStreamResponse(_message.Message):
    __slots__ = ("text", "num_tokens", "stop_match", "done")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_MATCH_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    text: str
    num_tokens: int
    stop_match: StopStringMatch
    done: bool
    def __init__(self, text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., stop_match: _Optional[_Union[StopStringMatch, _Mapping]] = ..., done: _Optional[bool] = ...) -> None: ...

class DetokenizeSessionsRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[SessionInput]
    def __init__(self, inputs: _Optional[_Iterable[_Union[SessionInput, _Mapping]]] = ...) -> None: ...

class SessionInput(_message.Message):
    __slots__ = ("session_id", "open", "token_ids", "finish", "cancel")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    open: DetokenizeStreamStart
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish: bool
    cancel: bool
    def __init__(self, session_id: _Optional[int] = ..., open: _Optional[_Union[DetokenizeStreamStart, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish: _Optional[bool] = ..., cancel: _Optional[bool] = ...) -> None: ...

class DetokenizeSessionsResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SessionUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[SessionUpdate, _Mapping]]] = ...) -> None: ...

class SessionUpdate(_message.Message):
    __slots__ = ("session_id", "text", "num_tokens", "stop_match", "done", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_MATCH_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    text: str
    num_tokens: int
    stop_match: StopStringMatch
    done: bool
    error: _common_pb2.StreamError
    def __init__(self, session_id: _Optional[int] = ..., text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., stop_match: _Optional[_Union[StopStringMatch, _Mapping]] = ..., done: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ...) -> None: ...

class StopStringMatch(_message.Message):
    __slots__ = ("stop", "token_index")
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    stop: str
    token_index: int
    def __init__(self, stop: _Optional[str] = ..., token_index: _Optional[int] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("service", "vocab_size", "bos_token_id", "eos_token_ids", "pad_token_id", "max_length", "has_chat_template", "max_text_bytes", "max_stop_strings", "max_stop_string_bytes", "max_ids_per_request", "max_sessions_per_stream")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRING_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IDS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_STREAM_FIELD_NUMBER: _ClassVar[int]
    service: _common_pb2.ServiceInfo
    vocab_size: int
    bos_token_id: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pad_token_id: int
    max_length: int
    has_chat_template: bool
    max_text_bytes: int
    max_stop_strings: int
    max_stop_string_bytes: int
    max_ids_per_request: int
    max_sessions_per_stream: int
    def __init__(self, service: _Optional[_Union[_common_pb2.ServiceInfo, _Mapping]] = ..., vocab_size: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., pad_token_id: _Optional[int] = ..., max_length: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., max_text_bytes: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_stop_string_bytes: _Optional[int] = ..., max_ids_per_request: _Optional[int] = ..., max_sessions_per_stream: _Optional[int] = ...) -> None: ...
