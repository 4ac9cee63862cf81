"""Telemetry shared by the three services: OpenTelemetry traces (W3C trace context in gRPC metadata,
configured by the standard OTEL_* variables) and Prometheus metrics on /metrics.

A service calls `telemetry.setup("kvmesh-engine", metrics_port=args.metrics_port, host=args.host)`
once; kvmesh.serving's start_server and create_channel add the tracing interceptors to every server
and channel. Per tier: telemetry.router (request span, picks), telemetry.engine (request events,
step spans, engine metrics), telemetry.tokenizer (token counts).
"""

from __future__ import annotations

from kvmesh.telemetry import attributes
from kvmesh.telemetry.metrics import EngineMetrics, RouterMetrics, start_metrics_server
from kvmesh.telemetry.tracing import (
    client_interceptors,
    finish_reason_name,
    record_status,
    sampling_attributes,
    server_interceptors,
    setup_tracing,
    shutdown_tracing,
    tracing_enabled,
)


def setup(default_service_name: str, *, metrics_port: int | None = None, host: str = "127.0.0.1") -> int | None:
    """Install tracing from the OTEL_* environment and start /metrics when metrics_port is set.

    Returns the bound metrics port (None when metrics are off)."""
    setup_tracing(default_service_name)
    return start_metrics_server(metrics_port, host)


__all__ = [
    "attributes", "setup", "setup_tracing", "shutdown_tracing", "tracing_enabled", "server_interceptors",
    "client_interceptors", "record_status", "finish_reason_name", "sampling_attributes",
    "start_metrics_server", "EngineMetrics", "RouterMetrics",
]
