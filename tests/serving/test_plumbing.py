"""The shared server plumbing: error mapping for every RPC shape, health, graceful stop, env flags."""

from __future__ import annotations

import logging
import types

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from kvmesh.serving.channels import create_channel
from kvmesh.serving.config import EnvArgumentParser, add_server_flags
from kvmesh.serving.errors import ExceptionMappingInterceptor, InvalidArgument, ResourceExhausted, _wrap_stream
from kvmesh.serving.server import start_server
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc


class _Servicer(engine_pb2_grpc.EngineServicer):
    """Raises a different kind of error from each RPC shape."""

    async def GetLoad(self, request, context):
        raise InvalidArgument("request_id", "must not be empty")

    async def GetInfo(self, request, context):
        raise RuntimeError("secret detail that must not leak")

    async def GetStatus(self, request, context):
        raise ResourceExhausted("busy", retry_after_s=1.5)

    async def Generate(self, request, context):
        yield engine_pb2.GenerateResponse(request_id="a")
        raise KeyError("also secret")


@pytest.fixture
async def server():
    running = await start_server(
        register=lambda s: engine_pb2_grpc.add_EngineServicer_to_server(_Servicer(), s),
        service_names=["kvmesh.v1.Engine"], port=0)
    yield running
    await running.stop(0)


async def test_errors_map_to_precise_statuses(server):
    async with create_channel(f"127.0.0.1:{server.port}") as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetLoad(engine_pb2.GetLoadRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "request_id: must not be empty"
        status = rpc_status.from_call(err.value)
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad) and bad.field_violations[0].field == "request_id"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetInfo(common_pb2.GetInfoRequest())
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details() and "internal error" in err.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetStatus(engine_pb2.GetStatusRequest())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details_pb2.RetryInfo()
        assert rpc_status.from_call(err.value).details[0].Unpack(retry)
        assert retry.retry_delay.ToNanoseconds() == 1_500_000_000

        call = stub.Generate(engine_pb2.GenerateRequest())
        first = await call.read()
        assert first.request_id == "a"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INTERNAL and "secret" not in err.value.details()


async def test_each_method_is_wrapped_once_and_every_call_is_mapped(server):
    calls = []
    handlers = {"/kvmesh.v1.Engine/GetLoad": grpc.unary_unary_rpc_method_handler(lambda request, context: None)}

    async def continuation(details):
        calls.append(details.method)
        return handlers.get(details.method)

    interceptor = ExceptionMappingInterceptor()
    details = [types.SimpleNamespace(method=m, invocation_metadata=())
               for m in ["/kvmesh.v1.Engine/GetLoad", "/kvmesh.v1.Engine/GetLoad", "/x.Y/Unknown"]]
    first = await interceptor.intercept_service(continuation, details[0])
    assert await interceptor.intercept_service(continuation, details[1]) is first
    assert await interceptor.intercept_service(continuation, details[2]) is None
    assert await interceptor.intercept_service(continuation, details[2]) is None  # misses are not kept
    assert calls == ["/kvmesh.v1.Engine/GetLoad", "/x.Y/Unknown", "/x.Y/Unknown"]
    # Through a real server: the cached handler maps the second call's error as the first.
    async with create_channel(f"127.0.0.1:{server.port}") as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetLoad(engine_pb2.GetLoadRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "request_id: must not be empty"


async def test_health_serving_then_not_serving_on_stop(server):
    async with create_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "kvmesh.v1.Engine"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await server.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Engine"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_env_defaults_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("KVMESH_PORT", "6123")
    monkeypatch.setenv("KVMESH_GRACE", "2.5")
    parser = EnvArgumentParser()
    add_server_flags(parser, default_port=50051)
    args = parser.parse_args([])
    assert (args.port, args.grace) == (6123, 2.5)
    assert parser.parse_args(["--port", "7000"]).port == 7000
    monkeypatch.setenv("KVMESH_PORT", "not-a-number")
    with pytest.raises(SystemExit):
        add_server_flags(EnvArgumentParser(), default_port=1)


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
async def test_reflection_answers_v1_and_v1alpha(server, service):
    """grpcurl and newer tools ask grpc.reflection.v1 first; older ones v1alpha. Both list every service
    and describe ours."""
    from grpc_reflection.v1alpha import reflection_pb2 as pb  # v1 has the same messages and field numbers

    async with create_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                     request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=pb.ServerReflectionResponse.FromString)
        replies = [r async for r in call(iter([pb.ServerReflectionRequest(list_services=""),
                                                pb.ServerReflectionRequest(file_containing_symbol="kvmesh.v1.Engine")]),
                                         timeout=10)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"kvmesh.v1.Engine", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the engine's .proto, for describe


async def test_a_server_stop_under_a_stream_read_is_no_servicer_error(caplog):
    """A request stream's read raises _ServerStoppedError once the server stopped under it (its
    caller went away during shutdown): it propagates to grpc.aio, which logs one line, instead of
    becoming an "unexpected error" with a traceback (and an abort on a call that is gone)."""
    async def handler(requests, context):
        async for _ in requests:
            yield None

    async def stopped():
        raise cygrpc._ServerStoppedError("Server already stopped.")
        yield  # an async iterator, as grpc.aio's request iterator

    wrapped = _wrap_stream("/kvmesh.v1.Tokenizer/TokenizeStream", handler, streaming_in=True)
    with caplog.at_level(logging.INFO), pytest.raises(cygrpc._ServerStoppedError):
        async for _ in wrapped(stopped(), None):  # no context: an abort would fail on it
            pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
