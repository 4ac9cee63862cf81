"""The router's request logic against scripted in-process engines (tests/router/fakes.py): failover
before the first token, one StreamError after it, stop strings abort the engine, cancellation and
deadlines reach the engine, limits, overload, auth. The real-process tests are in test_e2e.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.discovery import parse_targets
from router.server import Router
from tests.router.fakes import FakeEngine, decode, serve_engine, serve_tokenizer


class Harness:
    def __init__(self, engines: list[FakeEngine], **config):
        self.fakes = engines
        self.config = config
        self.servers = []

    async def __aenter__(self):
        tok, tok_addr = await serve_tokenizer()
        self.servers.append(tok)
        addrs = []
        for fake in self.fakes:
            running, addr = await serve_engine(fake)
            self.servers.append(running)
            addrs.append(addr)
        self.addrs = addrs
        cfg = RouterConfig(tokenizer=tok_addr, engines=parse_targets(",".join(addrs)), heartbeat_ms=100,
                           **self.config).validate()
        self.router = Router(cfg, host="127.0.0.1", port=0, max_message_bytes=1 << 22)
        await self.router.start()
        for _ in range(200):
            if len(self.router.pool.ready()) == len(addrs):
                break
            await asyncio.sleep(0.02)
        assert len(self.router.pool.ready()) == len(addrs)
        self.channel = create_channel(f"127.0.0.1:{self.router.running.port}")
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.router.stop(0)
        for s in self.servers:
            await s.stop(0)

    async def collect(self, req, **kw) -> list[router_pb2.RouterGenerateResponse]:
        return [r async for r in self.stub.Generate(req, **kw)]


def text_req(text="hello", max_tokens=5, **kw) -> router_pb2.RouterGenerateRequest:
    return router_pb2.RouterGenerateRequest(text=text, sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
                                            **kw)


async def test_stream_text_usage_and_tokens():
    async with Harness([FakeEngine("e0")]) as h:
        out = await h.collect(text_req("hello", 7, return_tokens=True))
        assert "".join(r.text for r in out) == "hellohe"
        assert out[0].engine_id == "e0" and out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (5, 7)
        assert [t.index for r in out for t in r.tokens] == list(range(7))
        assert h.router.pool.engines[h.addrs[0]].in_flight == 0


async def test_failover_before_first_token_is_invisible():
    down, up = FakeEngine("down", total_blocks=1000, fail_before_first=True), FakeEngine("up", total_blocks=10)
    async with Harness([down, up]) as h:
        out = await h.collect(text_req())  # "down" has the most free blocks: chosen first, fails
        assert len(down.requests) == 1 and len(up.requests) == 1
        assert out[0].engine_id == "up" and out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert h.router.pool.engines[h.addrs[0]].num_ejections == 1  # ejected until its health is re-checked


async def test_engine_lost_after_first_token_ends_with_one_stream_error():
    async with Harness([FakeEngine("e0", fail_after=3)]) as h:
        out = await h.collect(text_req(max_tokens=10))
        assert "".join(r.text for r in out) == "hel"
        last = out[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert last.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert last.error.reason == common_pb2.ERROR_REASON_ENGINE_LOST and "after 3 tokens" in last.error.message
        assert sum(1 for r in out if r.HasField("error")) == 1


async def test_stop_string_aborts_the_engine_and_counts_its_tokens():
    fake = FakeEngine("e0", step_s=0.02)
    async with Harness([fake]) as h:
        out = await h.collect(text_req("abcdefgh", 50, stop=["cd"], return_tokens=True))
        last = out[-1]
        assert "".join(r.text for r in out) == "ab"
        assert last.finish_reason == common_pb2.FINISH_REASON_STOP_STRING and last.matched_stop_string == "cd"
        assert [t.index for r in out for t in r.tokens] == [0, 1, 2, 3]  # up to the matching token
        rid = last.request_id
        assert fake.aborted == [rid]
        assert last.usage.completion_tokens == fake.generated[rid] <= 5  # at most one step past the match


class DeadlineOnlyContext:
    """What RouterServicer.Generate reads of a grpc context: a deadline the client side does not
    enforce (as a client whose own timer runs late), and the status the handler sets."""

    def __init__(self, remaining_s: float):
        self.remaining_s, self.code, self.details = remaining_s, None, None

    def time_remaining(self) -> float:
        return self.remaining_s

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


async def test_the_routers_own_deadline_ends_the_call_with_deadline_exceeded():
    from router.servicer import RouterServicer
    fake = FakeEngine("e0", step_s=0.05)
    async with Harness([fake]) as h:
        servicer = RouterServicer(h.router.orchestrator, h.router.deployment, h.router.streams)
        context = DeadlineOnlyContext(0.3)
        outs = [r async for r in servicer.Generate(text_req(max_tokens=200, request_id="d2"), context)]
        assert outs[-1].error.reason == common_pb2.ERROR_REASON_DEADLINE_EXCEEDED and len(outs) > 1
        assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline exceeded" in context.details


async def test_client_cancel_and_deadline_reach_the_engine():
    fake = FakeEngine("e0", step_s=0.05)
    async with Harness([fake]) as h:
        call = h.stub.Generate(text_req(max_tokens=200, request_id="c1"))
        await call.read()
        call.cancel()
        for _ in range(100):
            if fake.cancelled:
                break
            await asyncio.sleep(0.02)
        assert fake.cancelled == ["c1"] and not fake.live

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req(max_tokens=200, request_id="d1"), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _, remaining = fake.requests[-1]
        assert remaining is not None and 0 < remaining < 0.5  # the remaining deadline went downstream
        engine = h.router.pool.engines[h.addrs[0]]
        for _ in range(100):  # the engine call's own deadline can end it before the router's cleanup runs
            if "d1" in fake.cancelled and engine.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert "d1" in fake.cancelled and not fake.live
        assert engine.in_flight == 0


async def test_limits_overload_and_duplicates():
    async with Harness([FakeEngine("e0", total_blocks=8)], queue_ratio=0.0, max_concurrent_streams=2) as h:
        cases = [
            (router_pb2.RouterGenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
            (text_req(max_tokens=600), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
            # The model allows 512 tokens, but the only engine holds 8 blocks of 16: the deployment's
            # max_model_len (GetInfo and this check) is what a configured engine can hold, 128.
            (text_req(max_tokens=510), grpc.StatusCode.INVALID_ARGUMENT, "exceeds max_model_len 128"),
            (text_req(stop=["x"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
            (text_req(model="other"), grpc.StatusCode.NOT_FOUND, "other"),
            (router_pb2.RouterGenerateRequest(token_ids=common_pb2.TokenIds(ids=[1, 300])),
             grpc.StatusCode.INVALID_ARGUMENT, "300"),
        ]
        for req, code, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await h.collect(req)
            assert err.value.code() == code and words in err.value.details(), err.value.details()
        # 8 blocks of 16 tokens; this needs 5 + 200 tokens = 13 blocks: it could never run here.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req(max_tokens=200))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "= 205 exceeds max_model_len 128" in err.value.details()
        assert (await h.stub.GetInfo(common_pb2.GetInfoRequest())).max_model_len == 128
        # 5 + 100 tokens = 7 blocks fit an empty engine, but not beside a live request of 4 blocks
        # (queue_ratio 0: engines may not queue): overloaded, retry later.
        busy = h.stub.Generate(text_req(max_tokens=50))
        await busy.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req(max_tokens=100))
        busy.cancel()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in rpc_status.from_call(err.value).details)
        assert retry.retry_delay.ToNanoseconds() > 0

        first = h.stub.Generate(text_req(max_tokens=20, request_id="dup"))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req(request_id="dup"))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        second = h.stub.Generate(text_req(max_tokens=20))
        await second.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams open" in err.value.details()
        first.cancel()
        second.cancel()


async def test_bearer_token():
    async with Harness([FakeEngine("e0")], auth_token="s3cret") as h:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.collect(text_req())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.GetInfo(common_pb2.GetInfoRequest(), metadata=[("authorization", "Bearer s3cre")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = await h.collect(text_req(), metadata=[("authorization", "Bearer s3cret")])
        assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_tls_with_bearer_token(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    async with Harness([FakeEngine("e0")], tls_cert=str(cert), tls_key=str(key), auth_token="t") as h:
        target = f"127.0.0.1:{h.router.running.port}"
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(target, creds) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            out = [r async for r in stub.Generate(text_req(), metadata=[("authorization", "Bearer t")])]
            assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        with pytest.raises(grpc.aio.AioRpcError) as err:  # plaintext to a TLS port fails
            await h.collect(text_req(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "kvmesh.cli.main", "generate", "--router", target, "--prompt", "hey",
                              "--max-tokens", "3", "--tls-ca", str(cert), "--auth-token", "t"],
                             capture_output=True, text=True, timeout=60)
        assert (cli.returncode, cli.stdout) == (0, "hey\n"), cli.stderr


async def test_info_and_models():
    async with Harness([FakeEngine("e0"), FakeEngine("e1")]) as h:
        info = await h.stub.GetInfo(common_pb2.GetInfoRequest())
        assert (info.name, info.model, info.max_model_len, info.vocab_size) == ("kvmesh-router", "fake", 512, 259)
        models = await h.stub.ListModels(router_pb2.ListModelsRequest())
        assert [(m.name, m.num_ready_replicas) for m in models.models] == [("fake", 2)]
        chat = router_pb2.RouterGenerateRequest(
            chat=router_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hi")]),
            sampling=common_pb2.SamplingParams(max_tokens=4))
        out = await h.collect(chat)
        assert "".join(r.text for r in out) == decode([c + 3 for c in b"<use"])
