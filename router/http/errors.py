"""Errors in OpenAI's JSON shape, with the HTTP status a client of OpenAI, vLLM or SGLang expects.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

The router's errors are gRPC statuses (kvmesh.serving.errors); `from_service_error` is the one place
they become HTTP statuses, and it renames the router's field paths ("sampling.max_tokens") to the
OpenAI request's ("max_tokens").
"""

from __future__ import annotations

import math
import re

import grpc
from fastapi.responses import JSONResponse

from kvmesh.serving.errors import ServiceError, status_code

# gRPC status -> (HTTP status, OpenAI error type).
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_INTERNAL = (500, "internal_server_error")

# The router's field paths (RouterGenerateRequest) -> the OpenAI request field a client sent.
_PARAMS = {
    "text": "prompt", "token_ids.ids": "prompt", "input": "prompt", "chat.messages": "messages",
    "sampling.max_tokens": "max_tokens", "sampling.top_logprobs": "top_logprobs", "request_id": "X-Request-Id",
}


# "field: why", the shape of every INVALID_ARGUMENT message in kvmesh (the engine's, passed through
# the router without its field, included).
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class OpenAIError(Exception):
    """An HTTP error answered in OpenAI's shape. `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))  # whole seconds (RFC 9110)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def bad_request(param: str, message: str) -> OpenAIError:
    """A 400 naming the field: the message starts with it, as the router's messages do."""
    return OpenAIError(400, f"{param}: {message}", param=param)


def openai_param(field: str, renames: dict[str, str] | None = None) -> str:
    """The OpenAI request field for a router field path ("sampling.temperature" -> "temperature");
    `renames` first (a chat request that sent max_completion_tokens)."""
    if renames and field in renames:
        return renames[field]
    if field in _PARAMS:
        return _PARAMS[field]
    if field.startswith("stop["):
        return "stop"
    return field.removeprefix("sampling.")


def from_service_error(exc: ServiceError, renames: dict[str, str] | None = None) -> OpenAIError:
    """The HTTP error for a router ServiceError raised before the first response."""
    status, kind = _STATUS.get(exc.code, _INTERNAL)
    field = getattr(exc, "field", None)
    if field is None and status == 400 and (match := _FIELD_PREFIX.match(exc.message)):
        field = match.group(1)
    param = openai_param(field, renames) if field else None
    message = exc.message
    if field and param != field and message.startswith(f"{field}:"):
        message = f"{param}:{message[len(field) + 1:]}"
    return OpenAIError(status, message, type=kind, param=param, code=exc.code.name.lower(),
                       retry_after_s=getattr(exc, "retry_after_s", None))


def from_stream_error(code: int, message: str) -> OpenAIError:
    """The HTTP error for a StreamError (a failure after the engine started: code is a gRPC number)."""
    grpc_code = status_code(code, grpc.StatusCode.INTERNAL)
    status, kind = _STATUS.get(grpc_code, _INTERNAL)
    return OpenAIError(status, message, type=kind, code=grpc_code.name.lower())
