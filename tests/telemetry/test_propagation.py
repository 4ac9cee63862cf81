"""W3C trace context across two of our grpc.aio servers, for every RPC shape, with errors and
cancellation: the wiring every kvmesh service gets from start_server and create_channel (tracing
interceptors + the error-mapping interceptor), checked without the real services."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from kvmesh.serving.channels import create_channel
from kvmesh.serving.errors import InvalidArgument
from kvmesh.serving.server import start_server
from kvmesh.telemetry import attributes as attrs
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc


class _Downstream(tokenizer_pb2_grpc.TokenizerServicer):
    async def Tokenize(self, request, context):
        trace.get_current_span().set_attribute(attrs.TOKENIZER_NUM_TOKENS, len(request.text))
        return tokenizer_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    async def DetokenizeStream(self, request_iterator, context):
        async for request in request_iterator:
            if request.HasField("tokens"):
                yield tokenizer_pb2.DetokenizeStreamResponse(num_tokens=len(request.tokens.ids))
            elif request.HasField("finish"):
                yield tokenizer_pb2.DetokenizeStreamResponse(done=True)
                return


class _Upstream(engine_pb2_grpc.EngineServicer):
    """Calls the downstream server from inside its own RPCs, as the router calls the tokenizer."""

    def __init__(self, downstream_port: int):
        self.channel = create_channel(f"127.0.0.1:{downstream_port}")
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)
        self.started = asyncio.Event()

    async def Generate(self, request, context):
        ids = (await self.stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="abc"))).token_ids

        async def stream():
            yield tokenizer_pb2.DetokenizeStreamRequest(start=tokenizer_pb2.DetokenizeStreamStart())
            yield tokenizer_pb2.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=ids))
            yield tokenizer_pb2.DetokenizeStreamRequest(finish=True)

        async for _ in self.stub.DetokenizeStream(stream()):
            pass
        yield engine_pb2.GenerateResponse(request_id="r1")
        if request.request_id == "hang":  # wait for the client to cancel
            self.started.set()
            await asyncio.sleep(60)

    async def GetLoad(self, request, context):
        raise InvalidArgument("request_id", "must not be empty")

    async def GetInfo(self, request, context):
        raise RuntimeError("boom")


@pytest.fixture
async def servers(memory_spans):
    down = await start_server(
        register=lambda s: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(_Downstream(), s),
        service_names=["kvmesh.v1.Tokenizer"])
    upstream = _Upstream(down.port)
    up = await start_server(
        register=lambda s: engine_pb2_grpc.add_EngineServicer_to_server(upstream, s),
        service_names=["kvmesh.v1.Engine"])
    channel = create_channel(f"127.0.0.1:{up.port}")
    yield engine_pb2_grpc.EngineStub(channel), upstream, memory_spans
    await channel.close()
    await upstream.channel.close()
    await up.stop(0)
    await down.stop(0)


async def _wait_spans(exporter, predicate, timeout_s: float = 5.0):
    for _ in range(int(timeout_s / 0.02)):
        spans = exporter.get_finished_spans()
        if predicate(spans):
            return spans
        await asyncio.sleep(0.02)
    raise AssertionError(f"spans missing; got {[(s.name, s.kind) for s in exporter.get_finished_spans()]}")


def _one(spans, name, kind):
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, (name, kind, [(s.name, s.kind) for s in spans])
    return found[0]


async def test_one_trace_across_unary_server_stream_and_bidi_calls(servers):
    stub, _, exporter = servers
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("client-root") as root:
        async for _ in stub.Generate(engine_pb2.GenerateRequest(request_id="ok")):
            pass
    spans = await _wait_spans(exporter, lambda s: sum(x.kind == SpanKind.SERVER for x in s) == 3
                              and sum(x.kind == SpanKind.CLIENT for x in s) == 3)
    assert {s.context.trace_id for s in spans} == {root.get_span_context().trace_id}
    gen_client = _one(spans, "/kvmesh.v1.Engine/Generate", SpanKind.CLIENT)
    gen_server = _one(spans, "/kvmesh.v1.Engine/Generate", SpanKind.SERVER)
    assert gen_client.parent.span_id == root.get_span_context().span_id
    assert gen_server.parent.span_id == gen_client.context.span_id
    for method in ("Tokenize", "DetokenizeStream"):
        client = _one(spans, f"/kvmesh.v1.Tokenizer/{method}", SpanKind.CLIENT)
        server = _one(spans, f"/kvmesh.v1.Tokenizer/{method}", SpanKind.SERVER)
        assert client.parent.span_id == gen_server.context.span_id, method
        assert server.parent.span_id == client.context.span_id, method
    assert _one(spans, "/kvmesh.v1.Tokenizer/Tokenize", SpanKind.SERVER).attributes[attrs.TOKENIZER_NUM_TOKENS] == 3
    # Health checks are not traced.
    assert not [s for s in spans if "Health" in s.name]


async def test_invalid_argument_sets_error_type_but_internal_also_fails_the_span(servers):
    stub, _, exporter = servers
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetLoad(engine_pb2.GetLoadRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetInfo(common_pb2.GetInfoRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    spans = await _wait_spans(exporter, lambda s: sum(x.kind == SpanKind.SERVER for x in s) == 2)
    bad = _one(spans, "/kvmesh.v1.Engine/GetLoad", SpanKind.SERVER)
    assert bad.attributes[attrs.ERROR_TYPE] == "INVALID_ARGUMENT"
    assert bad.attributes[attrs.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.status_code == StatusCode.UNSET  # the caller's fault, not the server's
    broken = _one(spans, "/kvmesh.v1.Engine/GetInfo", SpanKind.SERVER)
    assert broken.attributes[attrs.ERROR_TYPE] == "INTERNAL"
    assert broken.status.status_code == StatusCode.ERROR
    # The INTERNAL message carries this trace id (errors.current_trace_id reads the RPC's span).
    assert format(broken.context.trace_id, "032x") in err.value.details()
    client = _one(spans, "/kvmesh.v1.Engine/GetLoad", SpanKind.CLIENT)
    assert client.status.status_code == StatusCode.ERROR


async def test_client_span_of_a_read_style_stream_ends_with_the_rpc(servers):
    """The router drives DetokenizeStream with write()/read() and never reads EOF; its CLIENT span
    must end when the RPC does, not when the call object is garbage-collected."""
    _, upstream, exporter = servers
    call = upstream.stub.DetokenizeStream()
    await call.write(tokenizer_pb2.DetokenizeStreamRequest(start=tokenizer_pb2.DetokenizeStreamStart()))
    await call.write(tokenizer_pb2.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=[1, 2])))
    assert (await call.read()).num_tokens == 2
    await call.write(tokenizer_pb2.DetokenizeStreamRequest(finish=True))
    assert (await call.read()).done
    spans = await _wait_spans(exporter, lambda s: any(x.kind == SpanKind.CLIENT for x in s))
    client = _one(spans, "/kvmesh.v1.Tokenizer/DetokenizeStream", SpanKind.CLIENT)
    assert client.attributes[attrs.RPC_GRPC_STATUS_CODE] == 0
    assert client.status.status_code == StatusCode.UNSET and call is not None  # still referenced


@pytest.mark.parametrize("how", ["cancel_task", "cancel_call"])
async def test_cancelled_stream_ends_both_spans(servers, how):
    stub, upstream, exporter = servers
    call = stub.Generate(engine_pb2.GenerateRequest(request_id="hang"))

    async def consume():
        async for _ in call:
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(upstream.started.wait(), 5)
    if how == "cancel_task":  # the router's handler is cancelled while it reads the engine stream
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        call.cancel()  # its `finally` then cancels the engine call
    else:  # the router stops reading and cancels the call (a stop string matched)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    del call, task
    spans = await _wait_spans(exporter, lambda s: sum(x.name == "/kvmesh.v1.Engine/Generate" for x in s) == 2)
    server = _one(spans, "/kvmesh.v1.Engine/Generate", SpanKind.SERVER)
    assert server.attributes[attrs.ERROR_TYPE] == "CANCELLED"
    assert server.status.status_code == StatusCode.UNSET
    client = _one(spans, "/kvmesh.v1.Engine/Generate", SpanKind.CLIENT)
    assert client.attributes[attrs.RPC_GRPC_STATUS_CODE] == grpc.StatusCode.CANCELLED.value[0]
