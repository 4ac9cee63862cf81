"""TelemetryHooks on the real EngineCore (fake model runner, CPU): request-span events for queueing,
scheduling, each prefill chunk, first token, preemption, abort and finish; step spans linked to the
requests they served; the engine's metrics."""

from __future__ import annotations

from opentelemetry import trace
from prometheus_client import REGISTRY

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import FinishReason, Request
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken
from engine_svc.telemetry_hooks import TelemetryHooks
from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.engine import RequestTrace, StepTracer
from kvmesh.telemetry.metrics import EngineMetrics

BLOCK = 4


class _Runner:
    """Samples token 7 for every sequence that asks."""

    def execute(self, seqs):
        return [SampledToken(7) if s.sample else None for s in seqs]


def _core(hooks, num_blocks=64, budget=8):
    return EngineCore(_Runner(), num_blocks=num_blocks, block_size=BLOCK, eos_token_ids=[2], max_model_len=128,
                      max_num_batched_tokens=budget, max_num_seqs=8, hooks=hooks)


def _add(core, hooks, rid, prompt_len, max_tokens):
    req = Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(temperature=0, max_tokens=max_tokens))
    with trace.get_tracer("test").start_as_current_span(f"req-{rid}", end_on_exit=False) as span:
        req.trace = hooks.begin(rid, prompt_len)  # as the Generate handler does, inside its span
    core.add(req)
    return span, req


def _run(core):
    outputs = []
    while core.has_work:
        outputs += core.step()
    return outputs


def _by_name(exporter, name):
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _requests(exporter):
    """The engine request spans, by request id."""
    return {s.attributes[attrs.REQUEST_ID]: s for s in _by_name(exporter, attrs.REQUEST_SPAN_NAME)}


def _steps(exporter):
    return sorted(_by_name(exporter, attrs.STEP_SPAN_NAME), key=lambda s: s.attributes[attrs.STEP_INDEX])


def _columns(steps):
    """(first step, steps covered, prefill tokens, decode tokens) of each step span."""
    return [(s.attributes[attrs.STEP_INDEX], s.attributes[attrs.STEP_COUNT], s.attributes[attrs.STEP_NUM_PREFILL_TOKENS],
             s.attributes[attrs.STEP_NUM_DECODE_TOKENS]) for s in steps]


def test_decode_runs_share_a_span_until_the_batch_changes_or_the_run_is_long(memory_spans, monkeypatch):
    monkeypatch.setattr(StepTracer, "MAX_RUN_STEPS", 4)
    hooks = TelemetryHooks("m-runs")
    core = _core(hooks, budget=64)
    a, req_a = _add(core, hooks, "a", prompt_len=3, max_tokens=3)
    b, req_b = _add(core, hooks, "b", prompt_len=3, max_tokens=9)
    _run(core)
    a.end(), b.end()
    steps = _steps(memory_spans)
    # Step 1 prefills both; a decodes in steps 2-3 and finishes; b alone decodes steps 4-9, in runs
    # of at most 4 steps.
    assert _columns(steps) == [(1, 1, 6, 0), (2, 2, 0, 4), (4, 4, 0, 4), (8, 2, 0, 2)]
    ids = {req_a.trace.context.span_id: "a", req_b.trace.context.span_id: "b"}
    assert [sorted(ids[link.context.span_id] for link in s.links) for s in steps] == [["a", "b"], ["a", "b"], ["b"], ["b"]]
    assert sum(c[1] for c in _columns(steps)) == core.num_steps


def test_events_steps_and_links_for_a_chunked_prefill(memory_spans):
    hooks = TelemetryHooks("m", engine_id="e0")
    core = _core(hooks, budget=8)
    span, req_a = _add(core, hooks, "a", prompt_len=19, max_tokens=3)
    outputs = _run(core)
    span.end()
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    req = _requests(memory_spans)["a"]
    assert req.parent.span_id == span.get_span_context().span_id  # a child of the RPC's span
    names = [e.name for e in req.events]
    assert names == [attrs.EVENT_QUEUED, attrs.EVENT_SCHEDULED, attrs.EVENT_PREFILL_CHUNK, attrs.EVENT_PREFILL_CHUNK,
                     attrs.EVENT_PREFILL_CHUNK, attrs.EVENT_FIRST_TOKEN, attrs.EVENT_FINISHED]
    chunks = [(e.attributes[attrs.STEP_INDEX], e.attributes[attrs.CHUNK_START], e.attributes[attrs.CHUNK_TOKENS])
              for e in req.events if e.name == attrs.EVENT_PREFILL_CHUNK]
    assert chunks == [(1, 0, 8), (2, 8, 8), (3, 16, 3)]
    assert req.events[-1].attributes[attrs.FINISH_REASON] == "length"
    assert req.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 3
    assert req.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    steps = _steps(memory_spans)
    assert core.num_steps == 5  # 3 prefill chunks (the last samples the first token), then 2 decodes
    for step in steps:  # every span, the last one included, links to the request it served
        assert [link.context.span_id for link in step.links] == [req_a.trace.context.span_id]
        assert step.parent is None and step.context.trace_id != span.get_span_context().trace_id
        assert step.start_time <= step.end_time
    # One span per prefill step; the two decode steps over the same batch share one.
    assert _columns(steps) == [(1, 1, 8, 0), (2, 1, 8, 0), (3, 1, 3, 0), (4, 2, 0, 2)]
    assert req.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS] == 19 and req.attributes[attrs.REQUEST_ID] == "a"
    assert not hooks._contexts and not hooks._ended  # nothing kept after the request ended


def test_preemption_and_abort_are_recorded(memory_spans):
    hooks = TelemetryHooks("m-preempt")
    core = _core(hooks, num_blocks=4, budget=16)  # 16 token slots: two growing requests cannot both fit
    a, req_a = _add(core, hooks, "a", prompt_len=6, max_tokens=8)
    b, _ = _add(core, hooks, "b", prompt_len=6, max_tokens=8)
    for _ in range(6):
        core.step()
    assert core.scheduler.num_preemptions >= 1
    req_a.trace.client_cancelled()
    core.abort("a")
    _run(core)
    a.end(), b.end()
    spans = _requests(memory_spans)
    preempted = [e for s in ("a", "b") for e in spans[s].events if e.name == attrs.EVENT_PREEMPTED]
    assert len(preempted) == core.scheduler.num_preemptions
    aborted = [e for e in spans["a"].events if e.name == attrs.EVENT_ABORTED]
    assert [e.attributes[attrs.ABORT_REASON] for e in aborted] == ["client_cancelled"]
    assert spans["a"].attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS] == ("cancelled",)
    assert spans["b"].events[-1].name == attrs.EVENT_FINISHED
    metrics = hooks.metrics
    assert metrics.preemptions._value.get() == core.scheduler.num_preemptions
    metrics.update_load(core.load())
    total = metrics.total._value.get()
    assert total == 4
    assert metrics.free._value.get() + metrics.cached._value.get() + metrics.in_use._value.get() == total


def test_non_recording_requests_count_in_metrics_and_warmup_does_not():
    hooks = TelemetryHooks("m-off")
    hooks.steps.enabled = False  # as in a process whose OTEL_TRACES_EXPORTER is none
    core = _core(hooks)
    traced = Request("x", [1, 2, 3], SamplingParams(temperature=0, max_tokens=2))
    traced.trace = RequestTrace(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT), hooks.metrics)
    core.add(traced)
    core.add(Request("y", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=2)))  # no trace: warm-up
    _run(core)
    assert hooks.metrics.ttft._sum.get() > 0
    assert hooks.metrics.prompt_tokens._value.get() == 3  # the warm-up request is not counted


def test_inter_token_latency_counts_every_token_after_the_first():
    # Outputs reach the handler in batches when the host falls behind the steps: a first output of 3
    # tokens, then 1, then 2 make 6 tokens, 5 inter-token gaps (the first output's extra two at 0 s).
    rt = RequestTrace(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT), EngineMetrics("m-itl"))
    for n in (3, 1, 2):
        rt.output(n)

    def sample(suffix, **labels):
        return REGISTRY.get_sample_value(f"kvmesh:inter_token_latency_seconds_{suffix}",
                                         {"model_name": "m-itl", **labels})

    assert sample("count") == 5 and rt.num_output_tokens == 6
    lowest = min((b.labels["le"] for b in REGISTRY.collect() for b in b.samples
                  if b.name == "kvmesh:inter_token_latency_seconds_bucket"), key=float)
    assert sample("bucket", le=lowest) >= 2  # the two 0 s gaps
