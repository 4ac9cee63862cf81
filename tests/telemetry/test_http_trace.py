"""The HTTP front's request span is the parent of the rest of the trace: a POST /v1/completions with a
W3C traceparent header against real processes (tokenizer, engine, router with --http-port on
stories260k) exporting to a real OTLP receiver in the test."""

from __future__ import annotations

import pathlib
import tempfile

import httpx
import pytest
from otlp_receiver import OtlpReceiver

from kvmesh.procs import ServiceProcess
from kvmesh.telemetry import attributes as attrs

pytestmark = pytest.mark.slow

STARTUP_S = 120
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def front(stories260k_dir):
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="kvmesh-http-trace-"))
    with OtlpReceiver() as receiver:
        env = receiver.env(schedule_delay_ms=100)
        common = ["--log-level", "WARNING", "--grace", "2"]

        def proc(kind, args):
            return ServiceProcess(kind=kind, name=kind, args=[*args, *common], env=env,
                                  log_path=str(log_dir / f"{kind}.log"), die_with_parent=True)

        tok = proc("tokenizer", ["--model", str(stories260k_dir)]).start()
        engine = proc("engine", ["--model", str(stories260k_dir), "--device", "cpu"]).start()
        procs = [tok, engine]
        try:
            tok.wait_healthy(STARTUP_S)
            engine.wait_healthy(STARTUP_S)
            router = proc("router", ["--tokenizer", tok.address, "--engines", engine.address, "--http-port", "0",
                                     "--http-port-file", str(log_dir / "http.port")]).start()
            procs.append(router)
            router.wait_healthy(STARTUP_S)
            yield receiver, f"http://127.0.0.1:{int((log_dir / 'http.port').read_text())}"
        finally:
            for p in reversed(procs):
                p.stop(10)


def _one(spans, service, name, kind):
    found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
    assert len(found) == 1, (service, name, kind, sorted((s.service, s.name, s.kind) for s in spans))
    return found[0]


def test_the_http_span_continues_the_callers_trace_and_parents_every_downstream_span(front):
    receiver, base_url = front
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "user": "alice"}
    reply = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60,
                       headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01", "x-request-id": "http-trace"})
    assert reply.status_code == 200, reply.text

    # Wait for every span asserted below: each process exports in its own batches, and the tokenizer's
    # DetokenizeStream span ends (and leaves) after the engine's and the router's.
    wanted = [("kvmesh-engine", "/kvmesh.v1.Engine/Generate", "SERVER"),
              ("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/Tokenize", "SERVER"),
              ("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/DetokenizeStream", "SERVER"),
              ("kvmesh-router", "text_completion stories260k", "SERVER")]

    def complete(spans):
        mine = {(s.service, s.name, s.kind) for s in spans if s.trace_id == TRACE_ID}
        return all(w in mine for w in wanted)

    spans = [s for s in receiver.wait_for(complete, timeout_s=20) if s.trace_id == TRACE_ID]
    # The HTTP SERVER span: a child of the caller's span, named and attributed as the gRPC path's is.
    http = _one(spans, "kvmesh-router", "text_completion stories260k", "SERVER")
    assert http.parent_span_id == CALLER_SPAN_ID
    a = http.attributes
    assert (a[attrs.HTTP_REQUEST_METHOD], a[attrs.HTTP_ROUTE], a[attrs.HTTP_RESPONSE_STATUS_CODE]) == \
        ("POST", "/v1/completions", 200)
    assert (a[attrs.REQUEST_ID], a[attrs.ENDUSER_ID], a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS]) == ("http-trace", "alice", 6)
    # Every downstream call hangs below it: router CLIENT span -> tokenizer / engine SERVER span.
    for service, method in (("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/Tokenize"),
                            ("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/DetokenizeStream"),
                            ("kvmesh-engine", "/kvmesh.v1.Engine/Generate")):
        client = _one(spans, "kvmesh-router", method, "CLIENT")
        assert client.parent_span_id == http.span_id, method
        assert _one(spans, service, method, "SERVER").parent_span_id == client.span_id, method
