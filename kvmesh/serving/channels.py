"""Client channels with keepalive and the same message-size limits as the servers."""

from __future__ import annotations

import grpc

from kvmesh.serving.server import DEFAULT_MAX_MESSAGE_BYTES
from kvmesh.telemetry.tracing import client_interceptors


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Detect a dead peer (a killed engine) within ~15 s even on an idle connection.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after an engine restarts.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def create_channel(target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   interceptors=None) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `target` ("host:port" or "dns:///name:port").

    Every call carries the caller's trace context (W3C traceparent in the metadata) and gets a
    CLIENT span; `interceptors` run inside that."""
    return grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes),
                                     interceptors=[*client_interceptors(), *(interceptors or [])])
