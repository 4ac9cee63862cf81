"""The three tiers on loopback (tokenizer, engine, router; stories260k on CPU) exporting to a real
OTLP/gRPC receiver inside the test, and serving /metrics: one trace per request across the
services, the GenAI attributes with the real counts, the routing event, engine events and step
spans linked to the request; a cancelled and an invalid request; metrics across a known sequence."""

from __future__ import annotations

import tempfile
import time

import grpc
import pytest
from otlp_receiver import OtlpReceiver
from prom import scrape

from kvmesh.procs import ServiceProcess
from kvmesh.telemetry import attributes as attrs
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from tests.ports import free_port

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl"
STARTUP_S = 120


class Mesh:
    def __init__(self, receiver: OtlpReceiver, model_dir: str):
        self.receiver = receiver
        self.log_dir = tempfile.mkdtemp(prefix="kvmesh-telemetry-")
        env = receiver.env(schedule_delay_ms=100)
        self.metrics_port = {name: free_port() for name in ("tokenizer", "engine", "router")}
        common = ["--log-level", "WARNING", "--grace", "2"]
        self.tokenizer = self._proc("tokenizer", ["--model", model_dir, *common], env)
        # A small token budget, so that the prompt is prefilled in more than one chunk.
        self.engine = self._proc("engine", ["--model", model_dir, "--device", "cpu",
                                            "--max-num-batched-tokens", "8", *common], env)
        self.router = None
        self._env, self._common = env, common

    def _proc(self, kind: str, args: list[str], env: dict) -> ServiceProcess:
        return ServiceProcess(kind=kind, name=kind, env=env, log_path=f"{self.log_dir}/{kind}.log",
                              args=[*args, "--metrics-port", str(self.metrics_port[kind])])

    def start(self) -> "Mesh":
        self.tokenizer.start()
        self.engine.start()
        self.tokenizer.wait_healthy(STARTUP_S)
        self.engine.wait_healthy(STARTUP_S)
        self.router = self._proc("router", ["--tokenizer", self.tokenizer.address, "--engines", self.engine.address,
                                            *self._common], self._env).start()
        self.router.wait_healthy(STARTUP_S)
        return self

    def stop(self) -> None:
        for p in (self.router, self.engine, self.tokenizer):
            if p is not None:
                p.stop(10)

    def scrape(self, kind: str) -> dict[str, float]:
        return scrape(self.metrics_port[kind])


@pytest.fixture(scope="module")
def mesh(stories260k_dir):
    with OtlpReceiver() as receiver:
        m = Mesh(receiver, str(stories260k_dir))
        try:
            yield m.start()
        finally:
            m.stop()


@pytest.fixture(scope="module")
def router_stub(mesh):
    with grpc.insecure_channel(mesh.router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def _generate(stub, **kwargs) -> list[router_pb2.RouterGenerateResponse]:
    return list(stub.Generate(router_pb2.RouterGenerateRequest(**kwargs), timeout=60))


def _count_tokens(mesh, text: str) -> int:
    with grpc.insecure_channel(mesh.tokenizer.address) as channel:
        reply = tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(tokenizer_pb2.TokenizeRequest(text=text), timeout=10)
    return len(reply.token_ids)


def _trace_of(mesh, request_id: str, done) -> list:
    """Wait for the spans of the trace whose router span carries request_id; `done(spans)` says when
    everything expected arrived. Returns that trace's spans plus the engine step spans."""
    def trace_spans(spans):
        roots = [s for s in spans if s.service == "kvmesh-router" and s.kind == "SERVER"
                 and s.attributes.get(attrs.REQUEST_ID) == request_id]
        if not roots:
            return None
        tid = roots[0].trace_id
        return [s for s in spans if s.trace_id == tid or any(link[0] == tid for link in s.links)]

    spans = mesh.receiver.wait_for(lambda all_spans: (t := trace_spans(all_spans)) is not None and done(t), timeout_s=20)
    return trace_spans(spans)


def _one(spans, service, name, kind):
    found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
    assert len(found) == 1, (service, name, kind, sorted((s.service, s.name, s.kind) for s in spans))
    return found[0]


def _has(service, name, kind="SERVER"):
    return lambda spans: any(s.service == service and s.name == name and s.kind == kind for s in spans)


def test_shared_engine_stream_carries_each_requests_trace(mesh):
    """A router on the shared GenerateStream when tracing (--engine-stream shared): no per-request
    Generate call, so the request's trace context travels in the request itself, and the engine's
    request span is a child of the router's request span, in the same trace."""
    router = ServiceProcess(kind="router", name="router-shared", env=mesh._env,
                            log_path=f"{mesh.log_dir}/router-shared.log",
                            args=["--tokenizer", mesh.tokenizer.address, "--engines", mesh.engine.address,
                                  "--engine-stream", "shared", *mesh._common]).start()
    try:
        router.wait_healthy(STARTUP_S)
        with grpc.insecure_channel(router.address) as channel:
            sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            responses = _generate(router_pb2_grpc.RouterStub(channel), request_id="trace-shared", text=PROMPT,
                                  sampling=sampling, return_tokens=True)
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        spans = _trace_of(mesh, "trace-shared", lambda spans: any(
            s.name == attrs.REQUEST_SPAN_NAME and s.events_named(attrs.EVENT_FINISHED) for s in spans))
    finally:
        router.stop(10)
    root = next(s for s in spans if s.service == "kvmesh-router" and s.kind == "SERVER"
                and s.attributes.get(attrs.REQUEST_ID) == "trace-shared")
    engine = _one(spans, "kvmesh-engine", attrs.REQUEST_SPAN_NAME, "INTERNAL")
    assert (engine.trace_id, engine.parent_span_id) == (root.trace_id, root.span_id)
    assert engine.attributes[attrs.REQUEST_ID] == "trace-shared"
    assert not [s for s in spans if "kvmesh.v1.Engine" in s.name]  # no per-request Generate call


def test_one_trace_across_router_tokenizer_and_engine(mesh, router_stub):
    max_tokens = 12
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    responses = _generate(router_stub, request_id="trace-one", text=PROMPT, sampling=sampling, return_tokens=True)
    last = responses[-1]
    num_generated = sum(len(r.tokens) for r in responses)
    num_prompt = _count_tokens(mesh, PROMPT)  # the tokenizer's own count: an independent oracle
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and num_generated == max_tokens
    assert last.usage.prompt_tokens == num_prompt

    def done(spans):
        engine = [s for s in spans if s.name == attrs.REQUEST_SPAN_NAME and s.events_named(attrs.EVENT_FINISHED)]
        steps = [s for s in spans if s.name == attrs.STEP_SPAN_NAME]
        return (_has("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/Tokenize")(spans)
                and _has("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/DetokenizeStream")(spans)
                # the Generate SERVER span ends after the engine's request span: wait for it too
                and _has("kvmesh-engine", "/kvmesh.v1.Engine/Generate")(spans)
                and bool(engine) and sum(s.attributes[attrs.STEP_NUM_DECODE_TOKENS] for s in steps) >= max_tokens - 1)
    spans = _trace_of(mesh, "trace-one", done)
    traced = [s for s in spans if s.name != attrs.STEP_SPAN_NAME]

    # One trace id across the three services.
    assert {s.service for s in traced} == {"kvmesh-router", "kvmesh-tokenizer", "kvmesh-engine"}
    assert len({s.trace_id for s in traced}) == 1

    # The router's request span: a root SERVER span named as the GenAI conventions name it.
    model = stories_model = mesh_model_name(mesh)
    router = _one(spans, "kvmesh-router", f"text_completion {stories_model}", "SERVER")
    assert router.parent_span_id == ""
    a = router.attributes
    assert a[attrs.GEN_AI_OPERATION_NAME] == "text_completion"
    assert a[attrs.GEN_AI_REQUEST_MODEL] == model
    assert a[attrs.GEN_AI_REQUEST_MAX_TOKENS] == max_tokens
    assert a[attrs.GEN_AI_REQUEST_TEMPERATURE] == 0.0
    assert a[attrs.GEN_AI_USAGE_INPUT_TOKENS] == num_prompt
    assert a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == num_generated
    assert a[attrs.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert a[attrs.GEN_AI_RESPONSE_ID] == "trace-one"
    assert attrs.ERROR_TYPE not in a

    # The routing decision, as an event on the request span.
    (route,) = router.events_named(attrs.EVENT_ROUTE_DECISION)
    assert route.attributes[attrs.ROUTE_CHOSEN] == mesh.engine.address
    assert route.attributes[attrs.ROUTE_CANDIDATES] == (mesh.engine.address,)
    assert route.attributes[attrs.ROUTE_PROMPT_TOKENS] == num_prompt

    # router -> tokenizer and router -> engine: SERVER spans whose parents are the router's CLIENT
    # spans, whose parent is the request span.
    for service, method in (("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/Tokenize"),
                            ("kvmesh-tokenizer", "/kvmesh.v1.Tokenizer/DetokenizeStream"),
                            ("kvmesh-engine", "/kvmesh.v1.Engine/Generate")):
        server = _one(spans, service, method, "SERVER")
        client = _one(spans, "kvmesh-router", method, "CLIENT")
        assert server.parent_span_id == client.span_id, method
        assert client.parent_span_id == router.span_id, method

    # The engine's request span, a child of its Generate span: attributes and events in order,
    # prefill chunks covering the prompt.
    engine = _one(spans, "kvmesh-engine", attrs.REQUEST_SPAN_NAME, "INTERNAL")
    assert engine.parent_span_id == _one(spans, "kvmesh-engine", "/kvmesh.v1.Engine/Generate", "SERVER").span_id
    e = engine.attributes
    assert (e[attrs.GEN_AI_USAGE_INPUT_TOKENS], e[attrs.GEN_AI_USAGE_OUTPUT_TOKENS]) == (num_prompt, max_tokens)
    assert e[attrs.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert e[attrs.REQUEST_ID] == "trace-one"
    names = [ev.name for ev in engine.events]
    chunks = engine.events_named(attrs.EVENT_PREFILL_CHUNK)
    assert names == [attrs.EVENT_QUEUED, attrs.EVENT_SCHEDULED, *[attrs.EVENT_PREFILL_CHUNK] * len(chunks),
                     attrs.EVENT_FIRST_TOKEN, attrs.EVENT_FINISHED]
    assert len(chunks) == -(-num_prompt // 8)  # the 8-token budget splits the prompt
    assert sum(c.attributes[attrs.CHUNK_TOKENS] for c in chunks) == num_prompt
    assert engine.events[-1].attributes[attrs.FINISH_REASON] == "length"

    # Step spans: roots of their own traces, linked to the engine request span; together they
    # computed the whole prompt and every decode step, each prefill chunk in a span of its own.
    steps = [s for s in spans if s.name == attrs.STEP_SPAN_NAME and (engine.trace_id, engine.span_id) in s.links]
    assert all(s.parent_span_id == "" and s.service == "kvmesh-engine" for s in steps)
    assert sum(s.attributes[attrs.STEP_NUM_PREFILL_TOKENS] for s in steps) == num_prompt
    assert sum(s.attributes[attrs.STEP_NUM_DECODE_TOKENS] for s in steps) == max_tokens - 1
    prefill_steps = sorted(s.attributes[attrs.STEP_INDEX] for s in steps if s.attributes[attrs.STEP_NUM_PREFILL_TOKENS])
    assert prefill_steps == [c.attributes[attrs.STEP_INDEX] for c in chunks]


def mesh_model_name(mesh) -> str:
    with grpc.insecure_channel(mesh.router.address) as channel:
        return router_pb2_grpc.RouterStub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=10).model


def test_cancelled_request_records_the_abort(mesh, router_stub):
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    call = router_stub.Generate(router_pb2.RouterGenerateRequest(request_id="trace-cancel", text=PROMPT,
                                                                 sampling=sampling), timeout=60)
    next(call)  # the first response: the request is committed to the engine and running
    call.cancel()

    def done(spans):
        return any(s.name == attrs.REQUEST_SPAN_NAME and s.events_named(attrs.EVENT_ABORTED)
                   for s in spans) and _has("kvmesh-router", f"text_completion {mesh_model_name(mesh)}")(spans)
    spans = _trace_of(mesh, "trace-cancel", done)
    engine = _one(spans, "kvmesh-engine", attrs.REQUEST_SPAN_NAME, "INTERNAL")
    (aborted,) = engine.events_named(attrs.EVENT_ABORTED)
    assert aborted.attributes[attrs.ABORT_REASON] == "client_cancelled"
    assert engine.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS] == ("cancelled",)
    assert 0 < engine.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] < 400
    assert not engine.events_named(attrs.EVENT_FINISHED)
    router = [s for s in spans if s.service == "kvmesh-router" and s.kind == "SERVER"][0]
    assert router.attributes[attrs.ERROR_TYPE] == "CANCELLED"
    assert [ev.attributes[attrs.ABORT_REASON] for ev in router.events_named(attrs.EVENT_ABORTED)] == ["client_cancelled"]


def test_invalid_argument_records_error_type(mesh, router_stub):
    sampling = common_pb2.SamplingParams(temperature=-1.0, max_tokens=4)
    with pytest.raises(grpc.RpcError) as err:
        _generate(router_stub, request_id="trace-invalid", text=PROMPT, sampling=sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = _trace_of(mesh, "trace-invalid", lambda spans: True)
    (router,) = [s for s in spans if s.service == "kvmesh-router" and s.kind == "SERVER"]
    assert router.attributes[attrs.ERROR_TYPE] == "INVALID_ARGUMENT"
    assert router.attributes[attrs.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert router.status_code == 0  # the caller's fault: the span is not marked failed
    assert not [s for s in spans if s.service == "kvmesh-engine"]  # rejected before any engine call


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_follow_a_known_sequence(mesh, router_stub):
    model = mesh_model_name(mesh)
    m = f'model_name="{model}"'
    engine_before, router_before = mesh.scrape("engine"), mesh.scrape("router")
    num_prompt = _count_tokens(mesh, PROMPT)
    for max_tokens in (5, 7):
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        assert _generate(router_stub, text=PROMPT, sampling=sampling)[-1].usage.completion_tokens == max_tokens
    # A cancelled one: counted as an abort, not a success.
    call = router_stub.Generate(router_pb2.RouterGenerateRequest(
        text=PROMPT, sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)), timeout=60)
    next(call)
    # While it runs (400 tokens take far longer than a scrape): one running request holding blocks.
    running = mesh.scrape("engine")
    g = {k: running[f"kvmesh:{k}{{{m}}}"] for k in ("num_requests_running", "num_requests_waiting", "kv_blocks_total",
                                                    "kv_blocks_free", "kv_blocks_cached", "kv_blocks_in_use",
                                                    "kv_cache_usage_perc")}
    call.cancel()
    assert (g["num_requests_running"], g["num_requests_waiting"]) == (1, 0)
    assert g["kv_blocks_in_use"] >= 1
    assert g["kv_blocks_free"] + g["kv_blocks_cached"] + g["kv_blocks_in_use"] == g["kv_blocks_total"]
    assert g["kv_cache_usage_perc"] == pytest.approx(g["kv_blocks_in_use"] / g["kv_blocks_total"])
    deadline = time.monotonic() + 10
    while True:  # the abort lands at the engine's next step boundary; the load snapshot just after
        engine_after = mesh.scrape("engine")
        aborted = _delta(engine_before, engine_after, f'kvmesh:request_aborts_total{{{m},reason="client_cancelled"}}')
        if (aborted == 1 and engine_after[f"kvmesh:num_requests_running{{{m}}}"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    router_after = mesh.scrape("router")

    assert _delta(engine_before, engine_after, f'kvmesh:request_success_total{{finished_reason="length",{m}}}') == 2
    assert _delta(engine_before, engine_after, f'kvmesh:request_aborts_total{{{m},reason="client_cancelled"}}') == 1
    assert _delta(engine_before, engine_after, f"kvmesh:prompt_tokens_total{{{m}}}") == 3 * num_prompt
    cancelled_tokens = _delta(engine_before, engine_after, f"kvmesh:generation_tokens_total{{{m}}}") - 12
    assert 1 <= cancelled_tokens < 400
    assert _delta(engine_before, engine_after, f"kvmesh:time_to_first_token_seconds_count{{{m}}}") == 3
    assert _delta(engine_before, engine_after, f"kvmesh:e2e_request_latency_seconds_count{{{m}}}") == 3
    assert _delta(engine_before, engine_after, f"kvmesh:inter_token_latency_seconds_count{{{m}}}") >= 4 + 6
    # Idle again: nothing running or waiting, no block in use, and the accounting invariant.
    g = {k: engine_after[f"kvmesh:{k}{{{m}}}"] for k in ("num_requests_running", "num_requests_waiting",
                                                         "kv_blocks_total", "kv_blocks_free", "kv_blocks_cached",
                                                         "kv_blocks_in_use", "kv_cache_usage_perc")}
    assert g["num_requests_running"] == g["num_requests_waiting"] == g["kv_blocks_in_use"] == 0
    assert g["kv_blocks_total"] > 0 and g["kv_cache_usage_perc"] == 0
    assert g["kv_blocks_free"] + g["kv_blocks_cached"] + g["kv_blocks_in_use"] == g["kv_blocks_total"]

    # The router: three picks of the one engine, the GenAI server histograms.
    picks = [k for k in router_after if k.startswith("kvmesh:router_picks_total{")]
    assert len(picks) == 1 and _delta(router_before, router_after, picks[0]) == 3
    g_ai = f'gen_ai_operation_name="text_completion",gen_ai_request_model="{model}"'
    assert _delta(router_before, router_after, f"gen_ai_server_time_to_first_token_seconds_count{{{g_ai}}}") == 3
    assert _delta(router_before, router_after, f"gen_ai_server_time_per_output_token_seconds_count{{{g_ai}}}") == 2
    assert _delta(router_before, router_after,
                  f'gen_ai_server_request_duration_seconds_count{{error_type="",{g_ai}}}') == 2
    assert _delta(router_before, router_after,
                  f'gen_ai_server_request_duration_seconds_count{{error_type="CANCELLED",{g_ai}}}') == 1


def test_services_logged_no_telemetry_warnings(mesh):
    """No span was written after it ended, no export failed (the services log at WARNING)."""
    for name in ("tokenizer", "engine", "router"):
        with open(f"{mesh.log_dir}/{name}.log") as f:
            text = f.read()
        assert "ended span" not in text and "Failed to export" not in text, (name, text[-2000:])
