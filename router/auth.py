"""Bearer-token authentication for the public endpoint, compared in constant time.

Health checks stay open (probes carry no credentials); every other method, reflection included,
needs `authorization: Bearer <token>` when a token is configured.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def token_matches(metadata, expected: bytes) -> bool:
    """True when the call's metadata holds `authorization: Bearer <expected>`."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        raw = value if isinstance(value, bytes) else value.encode()
        scheme, _, token = raw.partition(b" ")
        # compare_digest on the token alone: its time does not depend on where a guess differs.
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected):
            return True
    return False


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if token_matches(handler_call_details.invocation_metadata, self._expected):
            return handler
        return _deny(handler)


def _deny(handler):
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
