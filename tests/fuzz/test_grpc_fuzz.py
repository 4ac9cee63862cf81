"""gRPC fuzzing against real servers (a tokenizer, an engine and a router as processes on loopback):
hypothesis-generated request messages (random field values and random bytes) for every rpc of each
service, a bounded number of examples per service. Every call must end with a documented status
(never UNKNOWN, INTERNAL or a crash); afterwards the engine's blocks are back to their baseline,
every server still says SERVING and no process exited."""

from __future__ import annotations

import collections
import pathlib
import tempfile
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, tokenizer_pb2
from tests.fuzz.messages import requests
from tests.reliability.cluster import Cluster

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64
CALL_TIMEOUT_S = 1.0  # also ends watch streams (WatchLoad with a long heartbeat) early
MAX_RESPONSES = 48  # a stream is cancelled after this many responses
EXAMPLES = {"kvmesh.v1.Tokenizer": 60, "kvmesh.v1.Engine": 50, "kvmesh.v1.Router": 40}
# What a fuzzing client may be told (the protos' documented errors); DEADLINE_EXCEEDED and CANCELLED
# are its own deadline and cancel. Never UNKNOWN, INTERNAL, UNIMPLEMENTED, DATA_LOSS.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
_CHAT = [common_pb2.ChatMessage(role="user", content="Once upon a time")]
# Valid requests per message type, mutated by the fuzzer (tests/fuzz/messages.py).
SEEDS = {
    "RouterGenerateRequest": [
        router_pb2.RouterGenerateRequest(text="Once upon a time", sampling=_GREEDY, stop=[" the"], return_tokens=True),
        router_pb2.RouterGenerateRequest(token_ids=common_pb2.TokenIds(ids=[1, 30, 40]), sampling=_GREEDY),
        router_pb2.RouterGenerateRequest(chat=router_pb2.ChatInput(messages=_CHAT), sampling=_GREEDY)],
    "GenerateRequest": [engine_pb2.GenerateRequest(prompt_token_ids=[1, 30, 40], sampling=_GREEDY, include_load=True)],
    "GenerateStreamRequest": [
        engine_pb2.GenerateStreamRequest(requests=[engine_pb2.GenerateRequest(
            request_id="s1", prompt_token_ids=[1, 30, 40], sampling=_GREEDY, include_load=True,
            trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"})]),
        engine_pb2.GenerateStreamRequest(requests=[engine_pb2.GenerateRequest(
            request_id="s2", prompt_token_ids=[1, 50], sampling=_GREEDY)], cancel_request_ids=["s1"])],
    "WatchLoadRequest": [engine_pb2.WatchLoadRequest(min_interval_ms=0, heartbeat_ms=100)],
    "AbortRequest": [engine_pb2.AbortRequest(request_id="r")],
    "TokenizeRequest": [tokenizer_pb2.TokenizeRequest(text="Once upon a time")],
    "TokenizeStreamRequest": [tokenizer_pb2.TokenizeStreamRequest(items=[
        tokenizer_pb2.TokenizeItem(item_id=1, request=tokenizer_pb2.TokenizeRequest(text="Once upon a time")),
        tokenizer_pb2.TokenizeItem(item_id=2, request=tokenizer_pb2.TokenizeRequest(text="x" * 5000))])],
    "DetokenizeRequest": [tokenizer_pb2.DetokenizeRequest(token_ids=[1, 30, 40])],
    "ApplyChatTemplateRequest": [tokenizer_pb2.ApplyChatTemplateRequest(messages=_CHAT, tokenize=True)],
    "DetokenizeStreamRequest": [
        tokenizer_pb2.DetokenizeStreamRequest(start=tokenizer_pb2.DetokenizeStreamStart(prompt_token_ids=[1],
                                                                                        stop=["the"])),
        tokenizer_pb2.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=[30, 40, 50])),
        tokenizer_pb2.DetokenizeStreamRequest(finish=True)],
    "DetokenizeSessionsRequest": [
        tokenizer_pb2.DetokenizeSessionsRequest(inputs=[tokenizer_pb2.SessionInput(
            session_id=1, open=tokenizer_pb2.DetokenizeStreamStart(prompt_token_ids=[1], stop=["the"]),
            token_ids=[30, 40])]),
        tokenizer_pb2.DetokenizeSessionsRequest(inputs=[tokenizer_pb2.SessionInput(session_id=1, token_ids=[50]),
                                                        tokenizer_pb2.SessionInput(session_id=2, cancel=True)]),
        tokenizer_pb2.DetokenizeSessionsRequest(inputs=[tokenizer_pb2.SessionInput(session_id=1, finish=True)])],
}
FILES = {"kvmesh.v1.Tokenizer": tokenizer_pb2, "kvmesh.v1.Engine": engine_pb2, "kvmesh.v1.Router": router_pb2}
examples_run: dict[str, collections.Counter] = {}  # service -> (method, status) -> count


@pytest.fixture(scope="module")
def mesh(stories260k_dir):
    c = Cluster(stories260k_dir, pathlib.Path(tempfile.mkdtemp(prefix="kvmesh-fuzz-")))
    try:
        tok, engine = c.tokenizer(), c.engine(NUM_BLOCKS)
        c.wait_healthy(tok, engine)
        router = c.router(tok, [engine])
        c.wait_healthy(router)
        yield c, {"kvmesh.v1.Tokenizer": tok, "kvmesh.v1.Engine": engine, "kvmesh.v1.Router": router}
    finally:
        c.stop()


def _methods(service: str) -> list:
    return list(FILES[service].DESCRIPTOR.services_by_name[service.split(".")[-1]].methods)


def _call(channel: grpc.Channel, service: str, method, payloads: list[bytes]) -> grpc.StatusCode:
    """One call with raw request bytes; the status it ended with."""
    path = f"/{service}/{method.name}"
    try:
        if not method.server_streaming:
            fn = channel.stream_unary(path) if method.client_streaming else channel.unary_unary(path)
            fn(iter(payloads) if method.client_streaming else payloads[0], timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK
        fn = channel.stream_stream(path) if method.client_streaming else channel.unary_stream(path)
        call = fn(iter(payloads) if method.client_streaming else payloads[0], timeout=CALL_TIMEOUT_S)
        for i, _ in enumerate(call):
            if i + 1 >= MAX_RESPONSES:
                call.cancel()
                return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _fuzz(service: str, address: str) -> None:
    methods = _methods(service)
    seen = examples_run.setdefault(service, collections.Counter())

    @settings(max_examples=EXAMPLES[service], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        method = data.draw(st.sampled_from(methods), label="method")
        cls = getattr(FILES[service], method.input_type.name, None) or _common(method.input_type.name)
        n = data.draw(st.integers(1, 4), label="messages") if method.client_streaming else 1
        seeds = SEEDS.get(cls.DESCRIPTOR.name, [])
        if method.client_streaming and data.draw(st.booleans(), label="in order"):  # start, tokens..., finish
            payloads = [data.draw(requests(cls, [seed]), label="request") for seed in (seeds[:1] + seeds[1:2] * (n - 1)
                                                                                      + seeds[2:])]
        else:
            payloads = [data.draw(requests(cls, seeds), label="request") for _ in range(n)]
        code = _call(channel, service, method, payloads)
        seen[f"{method.name}:{code.name}"] += 1
        assert code in ALLOWED, (method.name, code, payloads)

    with grpc.insecure_channel(address) as channel:
        run()


def _common(name: str):
    return getattr(common_pb2, name)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _engine_idle(address: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        while True:
            load = stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
            idle = load.free_blocks + load.cached_blocks == load.total_blocks and not load.num_running_requests \
                and not load.num_waiting_requests
            if idle or time.monotonic() > deadline:
                return load
            time.sleep(0.1)


@pytest.mark.parametrize("service", list(EXAMPLES))
def test_fuzzed_requests_get_documented_statuses_and_leave_nothing_behind(mesh, service):
    cluster, procs = mesh
    _fuzz(service, procs[service].address)
    load = _engine_idle(procs["kvmesh.v1.Engine"].address)
    assert load.total_blocks == NUM_BLOCKS and load.free_blocks + load.cached_blocks == NUM_BLOCKS, load
    for proc in procs.values():
        proc.check_alive()
        assert _serving(proc.address), proc.name
    assert sum(examples_run[service].values()) == EXAMPLES[service]
    print(f"fuzz {service}: {EXAMPLES[service]} examples: {dict(sorted(examples_run[service].items()))}")
    logs = cluster.logs()
    assert "Traceback" not in logs, logs[-5000:]
