"""setup_tracing reads the standard OTEL_* variables and exports over OTLP/gRPC to a real receiver;
/metrics serves the definitions. Tracing setup is per process, so each case runs a small child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from otlp_receiver import OtlpReceiver
from prom import scrape

from kvmesh.telemetry.metrics import EngineMetrics, start_metrics_server

_CHILD = textwrap.dedent("""
    from opentelemetry import trace
    from kvmesh import telemetry
    provider = telemetry.setup_tracing("kvmesh-test-default")
    print("provider", provider is not None, telemetry.tracing_enabled())
    with trace.get_tracer("t").start_as_current_span("child-span") as span:
        span.set_attribute("k", 7)
""")


def _run_child(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_otlp_export_with_default_and_configured_service_name():
    with OtlpReceiver() as receiver:
        assert "provider True True" in _run_child(receiver.env())  # the exit path flushes
        spans = receiver.wait_for(lambda s: len(s) == 1)
        assert (spans[0].service, spans[0].name, spans[0].attributes) == ("kvmesh-test-default", "child-span", {"k": 7})
        receiver.clear()
        _run_child({**receiver.env(), "OTEL_SERVICE_NAME": "my-engine-7"})
        assert receiver.wait_for(lambda s: len(s) == 1)[0].service == "my-engine-7"


def test_none_exporter_and_sampler_off_export_nothing():
    with OtlpReceiver() as receiver:
        out = _run_child({**receiver.env(), "OTEL_TRACES_EXPORTER": "none"})
        assert "provider False False" in out
        _run_child({**receiver.env(), "OTEL_TRACES_SAMPLER": "always_off"})
        _run_child({**receiver.env(), "OTEL_TRACES_EXPORTER": "console"})
        # A child that does export proves the receiver was listening all along.
        _run_child({**receiver.env(), "OTEL_SERVICE_NAME": "control"})
        spans = receiver.wait_for(lambda s: len(s) >= 1)
        assert [s.service for s in spans] == ["control"]


def test_console_exporter_prints_and_bad_exporter_is_refused():
    assert '"name": "child-span"' in _run_child({"OTEL_TRACES_EXPORTER": "console"})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, "OTEL_TRACES_EXPORTER": "jaeger"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "OTEL_TRACES_EXPORTER='jaeger'" in out.stderr


class _Load:  # the LoadReport fields EngineMetrics reads
    num_running_requests, num_waiting_requests = 2, 1
    total_blocks, free_blocks, cached_blocks, in_use_blocks, reserved_blocks = 100, 60, 15, 25, 7


def test_metrics_endpoint_serves_engine_metrics():
    port = start_metrics_server(0)
    metrics = EngineMetrics("unit-model")
    metrics.update_load(_Load())
    metrics.finished("length", num_prompt_tokens=5, e2e_s=0.3)
    metrics.aborted("cancelled", num_prompt_tokens=4, e2e_s=0.1)
    samples = scrape(port)
    label = '{model_name="unit-model"}'
    assert samples["kvmesh:num_requests_running" + label] == 2
    assert samples["kvmesh:kv_blocks_in_use" + label] == 25
    assert samples["kvmesh:kv_cache_usage_perc" + label] == pytest.approx(0.25)
    assert samples["kvmesh:prompt_tokens_total" + label] == 9
    assert samples['kvmesh:request_success_total{finished_reason="length",model_name="unit-model"}'] == 1
    assert samples['kvmesh:request_aborts_total{model_name="unit-model",reason="cancelled"}'] == 1
    assert samples["kvmesh:e2e_request_latency_seconds_count" + label] == 2
