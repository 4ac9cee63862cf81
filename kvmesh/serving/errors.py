"""Typed service errors and the one interceptor that maps exceptions to gRPC statuses.

Three kinds of error (STYLE.md point 15): `assert` for internal invariants; a ServiceError subclass
for anything the caller did or must know (it becomes its status code, with `google.rpc` details
where they help); everything else becomes INTERNAL with a generic message and the trace id, never
the exception text and never the default UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc._cython import cygrpc
from grpc_status import rpc_status

from kvmesh.serving.malformed import Malformed, tolerant
from kvmesh.telemetry.tracing import record_status

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a definite gRPC status. Raise it anywhere below a servicer method."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, details: list | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details or [])

    def packed_details(self) -> list[any_pb2.Any]:
        """The google.rpc details as they go on the wire (a shared stream's per-request rejection
        carries them in its own message, not in trailing metadata)."""
        packed = []
        for detail in self.details:
            if isinstance(detail, any_pb2.Any):  # passed through from a downstream status as it came
                packed.append(detail)
                continue
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return packed

    def to_status(self) -> grpc.Status:
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=self.packed_details())
        return rpc_status.to_status(proto)


class InvalidArgument(ServiceError):
    """Bad input. `field` names the offending request field; it also goes into a BadRequest detail."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        super().__init__(f"{field}: {message}", details=[error_details_pb2.BadRequest(field_violations=[violation])])
        self.field = field


class ResourceExhausted(ServiceError):
    """Too large, or overloaded. With `retry_after_s`, a RetryInfo detail tells the client when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        details = []
        if retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


STATUS_DETAILS_KEY = "grpc-status-details-bin"  # trailing metadata: a serialized google.rpc.Status
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int, default: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> grpc.StatusCode:
    """The grpc.StatusCode of a status number (as a shared stream's messages carry it)."""
    return _CODES.get(value, default)


def with_status(code: int, message: str, details=()) -> ServiceError:
    """A ServiceError for a status that came as fields of a message (a per-request rejection on a
    shared stream): its code number, message and packed google.rpc details."""
    err = ServiceError(message, details=list(details))
    err.code = status_code(code)
    return err


def status_details(exc: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc details (BadRequest, RetryInfo, ...) of a failed call, packed as they came."""
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return list(status_pb2.Status.FromString(value).details)
    return []


def passed_through(exc: grpc.aio.AioRpcError, message: str | None = None) -> ServiceError:
    """A downstream failure re-raised with its status code and google.rpc details (a BadRequest's
    field violations reach the client as the service that found them wrote them)."""
    err = ServiceError(message or exc.details() or exc.code().name, details=status_details(exc))
    err.code = exc.code()
    return err


def current_trace_id() -> str:
    """The active OpenTelemetry trace id as 32 hex digits, or "" when there is none."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return ""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def internal_error(method: str, exc: BaseException) -> ServiceError:
    """Log an unexpected exception with its stack and return the generic INTERNAL error for the caller."""
    trace_id = current_trace_id()
    log.error("unexpected error in %s (trace %s)", method, trace_id or "-", exc_info=exc)
    suffix = f" (trace id {trace_id})" if trace_id else ""
    return ServiceError(f"internal error in {method}{suffix}")


async def _abort(context: grpc.aio.ServicerContext, err: ServiceError) -> None:
    await context.abort_with_status(err.to_status())


class ExceptionMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a servicer method to gRPC statuses, for all four RPC shapes.

    The wrapped handler of a method is built on its first call and kept: a method's handler never
    changes (this interceptor runs innermost, over the server's own registrations), so later calls
    cost one dict lookup."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None  # unknown method: not cached (any client can invent names)
            wrapped = self._handlers[method] = _mapped_handler(method, handler)
        return wrapped


def _mapped_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    streaming_in = handler.request_streaming
    if handler.response_streaming:
        behavior = handler.unary_stream or handler.stream_stream
        wrapped = _wrap_stream(method, behavior, streaming_in)
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream \
            else grpc.stream_stream_rpc_method_handler
    else:
        behavior = handler.unary_unary or handler.stream_unary
        wrapped = _wrap_unary(method, behavior, streaming_in)
        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary \
            else grpc.stream_unary_rpc_method_handler
    # A request that fails to parse becomes INVALID_ARGUMENT: a unary one arrives as a Malformed
    # marker (grpc parses it before the handler runs); in a request stream the parse raises
    # InvalidArgument from the servicer's own read (grpc.aio parses each message there).
    deserializer = _raising(handler.request_deserializer) if streaming_in else tolerant(handler.request_deserializer)
    return factory(wrapped, request_deserializer=deserializer, response_serializer=handler.response_serializer)


def _raising(deserializer):
    """A stream's deserializer that raises InvalidArgument for a message that does not parse: no
    per-message wrapper around the request iterator has to look at every message."""
    parse = tolerant(deserializer)
    if parse is None:
        return None

    def deserialize(data: bytes):
        request = parse(data)
        if isinstance(request, Malformed):
            raise InvalidArgument(request.field, request.reason)
        return request
    return deserialize


async def _handle(method: str, context, exc: BaseException) -> None:
    err = exc if isinstance(exc, ServiceError) else internal_error(method, exc)
    record_status(err.code, err.message)  # error.type on the RPC's span
    await _abort(context, err)


# Raised by a request stream's read once the server has stopped (its caller is gone): grpc.aio logs
# it as one line ("Aborting method ... due to server stop"); it is no error of the servicer's.
_SERVER_STOPPED = getattr(cygrpc, "_ServerStoppedError", asyncio.CancelledError)


def _passthrough(exc: BaseException) -> bool:
    # context.abort() raises AbortError; cancellation must propagate untouched (STYLE.md point 12).
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit, _SERVER_STOPPED))


def _record_cancel(exc: BaseException) -> None:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client went away
        record_status(grpc.StatusCode.CANCELLED)


def _checked(request):
    """Raise InvalidArgument for a Malformed unary request."""
    if isinstance(request, Malformed):
        raise InvalidArgument(request.field, request.reason)
    return request


def _wrap_unary(method, behavior, streaming_in=False):
    async def wrapper(request, context):
        try:
            result = behavior(request if streaming_in else _checked(request), context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:  # noqa: BLE001 - mapped below, or re-raised
            if _passthrough(exc) or not isinstance(exc, Exception):
                _record_cancel(exc)
                raise
            await _handle(method, context, exc)
    return wrapper


def _wrap_stream(method, behavior, streaming_in=False):
    async def wrapper(request, context):
        try:
            result = behavior(request if streaming_in else _checked(request), context)
            if inspect.isasyncgen(result):
                try:
                    async for item in result:
                        yield item
                finally:  # closed early (client gone): the handler's `finally` runs now, not at GC
                    await result.aclose()
            else:  # a coroutine that writes with context.write()
                await result
        except BaseException as exc:  # noqa: BLE001 - mapped below, or re-raised
            if _passthrough(exc) or not isinstance(exc, Exception):
                _record_cancel(exc)
                raise
            await _handle(method, context, exc)
    return wrapper


__all__ = [
    "ServiceError", "InvalidArgument", "ResourceExhausted", "AlreadyExists", "NotFound", "Unavailable",
    "Unauthenticated", "FailedPrecondition", "Cancelled", "DeadlineExceeded",
    "ExceptionMappingInterceptor", "internal_error", "current_trace_id", "passed_through", "status_details",
]
