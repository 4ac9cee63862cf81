"""Fixtures for the telemetry tests."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def memory_spans() -> InMemorySpanExporter:
    """In-process spans, for tests that run servers inside the test process. The global tracer
    provider can be set only once per process, so the first use installs one that keeps spans in
    memory (nothing is exported, so later tests are unaffected); each test starts with none."""
    provider = trace.get_tracer_provider()
    if not getattr(provider, "_kvmesh_test_memory", False):
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._kvmesh_test_memory = True
    _EXPORTER.clear()
    return _EXPORTER
