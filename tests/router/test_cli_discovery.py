"""The `kvmesh generate` client, engine discovery and the engine watcher's eject/re-admit cycle."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import pytest

from kvmesh.cli import generate as cli
from kvmesh.cli.main import main as kvmesh_main
from kvmesh.serving.config import EnvArgumentParser
from kvmesh.serving.server import start_server
from kvmesh.v1 import common_pb2, engine_pb2_grpc, router_pb2
from router.config import ConfigError, add_router_flags, config_from_args
from router.discovery import Discovery, Target, parse_targets, resolve
from router.engines import EnginePool
from tests.router.fakes import FakeEngine, serve_engine
from tests.router.test_orchestration import Harness


def parse(*argv):
    parser = EnvArgumentParser(prog="kvmesh")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_cli_builds_requests():
    req = cli.build_request(parse("--prompt", "hi", "--max-tokens", "5", "--temperature", "0", "--seed", "7",
                                  "--stop", "a", "--stop", "b", "--top-p", "0.5"))
    assert req.text == "hi" and list(req.stop) == ["a", "b"]
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.seed, s.top_p) == (5, 0.0, 7, 0.5)
    assert s.HasField("temperature") and not s.HasField("top_k") and not req.return_tokens
    req = cli.build_request(parse("--chat", "--system", "S", "--user", "U1", "--assistant", "A", "--user", "U2",
                                  "--json"))
    assert [(m.role, m.content) for m in req.chat.messages] == [
        ("system", "S"), ("user", "U1"), ("assistant", "A"), ("user", "U2")]
    assert req.return_tokens
    req = cli.build_request(parse("--chat", "--messages", '[{"role": "user", "content": "x"}]'))
    assert req.chat.messages[0].content == "x"
    assert list(cli.build_request(parse("--token-ids", "1,2,3")).token_ids.ids) == [1, 2, 3]
    for bad in (["--user", "x"], [], ["--chat"], ["--chat", "--messages", "{"], ["--token-ids", "1,x"]):
        with pytest.raises(ValueError):
            cli.build_request(parse(*bad))


def test_cli_imports_no_torch():
    code = "import sys, kvmesh.cli.main, kvmesh.cli.generate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_cli_streams_text_json_and_errors():
    async with Harness([FakeEngine("e0", fail_after=2)]) as h:
        router = f"127.0.0.1:{h.router.running.port}"

        def run(*argv):
            out, err = io.StringIO(), io.StringIO()
            rc = cli.run(parse("--router", router, *argv), out=out, err=err)
            return rc, out.getvalue(), err.getvalue()

        rc, out, err = await asyncio.to_thread(run, "--prompt", "hello", "--max-tokens", "2")
        assert (rc, out, err) == (0, "he\n", "")
        h.fakes[0].fail_after = None
        rc, out, _ = await asyncio.to_thread(run, "--prompt", "hello", "--max-tokens", "3", "--json")
        records = [json.loads(line) for line in out.splitlines()]
        assert rc == 0 and "".join(r["text"] for r in records) == "hel"
        assert [t["id"] for r in records for t in r.get("tokens", [])] == [ord(c) + 3 for c in "hel"]
        assert records[-1]["finish_reason"] == "LENGTH" and records[-1]["usage"]["completion_tokens"] == 3
        rc, _, err = await asyncio.to_thread(run, "--prompt", "hello", "--max-tokens", "100000")
        assert rc == 3 and err.startswith("error: INVALID_ARGUMENT: sampling.max_tokens")
        h.fakes[0].fail_after = 2
        rc, out, err = await asyncio.to_thread(run, "--prompt", "hello", "--max-tokens", "5")
        assert rc == 14 and out == "he\n" and "UNAVAILABLE" in err and "lost after 2 tokens" in err
    assert kvmesh_main(["generate", "--router", "127.0.0.1:1", "--prompt", "x", "--timeout", "2"]) == 14


def test_targets_and_config():
    assert parse_targets("a:1, dns:///svc.ns:50051,[::1]:7") == [
        Target("a", 1, False), Target("svc.ns", 50051, True), Target("::1", 7, False)]
    for bad in ("a", "a:0", "dns:///x", "", "a:b"):
        with pytest.raises(ValueError):
            parse_targets(bad)
    parser = EnvArgumentParser()
    add_router_flags(parser)
    args = parser.parse_args(["--tokenizer", "t:1", "--engines", "e:1", "--policy", "least-requests"])
    assert config_from_args(args).policy == "least_requests"
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        config_from_args(parser.parse_args(["--tokenizer", "t:1", "--engines", "e:1", "--tls-cert", "c"]))


async def test_dns_targets_resolve_to_every_address():
    addrs = await resolve(parse_targets("dns:///localhost:5000,10.0.0.1:6"))
    assert "127.0.0.1:5000" in addrs and "10.0.0.1:6" in addrs
    assert await resolve(parse_targets("dns:///no-such-host.invalid:1")) is None


async def test_dns_names_are_re_resolved_and_a_failed_lookup_keeps_the_set():
    answers = [{"10.0.0.1:5"}, {"10.0.0.1:5", "10.0.0.2:5"}, None, {"10.0.0.2:5"}]
    seen = []

    async def resolver(targets):
        return answers.pop(0) if answers else {"10.0.0.2:5"}

    discovery = Discovery(parse_targets("dns:///engines.svc:5"), seen.append, refresh_s=0.01, resolver=resolver)
    await discovery.start()
    await _until(lambda: not answers)
    await discovery.stop()
    assert seen == [{"10.0.0.1:5"}, {"10.0.0.1:5", "10.0.0.2:5"}, {"10.0.0.2:5"}]


async def test_router_finds_engines_by_dns_name():
    fake = FakeEngine("by-dns")
    running, addr = await serve_engine(fake)
    port = addr.rsplit(":", 1)[1]
    pool = EnginePool(staleness_bound_s=1.0, max_message_bytes=1 << 20, heartbeat_ms=100)
    discovery = Discovery(parse_targets(f"dns:///localhost:{port}"), pool.set_addresses, refresh_s=0.05)
    try:
        await discovery.start()
        await _until(lambda: [e.address for e in pool.ready()] == [addr])  # ::1, if listed, does not answer
    finally:
        await discovery.stop()
        await pool.close()
        await running.stop(0)


async def test_watcher_ejects_a_dead_engine_and_readmits_it_on_the_same_address():
    fake = FakeEngine("first")
    running, addr = await serve_engine(fake)
    pool = EnginePool(staleness_bound_s=1.0, max_message_bytes=1 << 20, heartbeat_ms=100)
    try:
        pool.set_addresses({addr})
        await _until(lambda: [e.address for e in pool.ready()] == [addr])
        await running.stop(0)
        # Ejection sets several flags; wait for the state where the reason is recorded too.
        await _until(lambda: not pool.ready() and bool(pool.engines[addr].ejected_reason))
        assert pool.engines[addr].ejected_reason
        port = int(addr.rsplit(":", 1)[1])
        running, _ = await _serve_on(FakeEngine("second"), port)
        await _until(lambda: bool(pool.ready()), timeout_s=20)
        assert pool.engines[addr].report.engine_id == "second"
        pool.set_addresses(set())  # left discovery: forgotten once idle
        assert not pool.engines
    finally:
        await pool.close()
        await running.stop(0)


async def _serve_on(fake, port):
    running = await start_server(register=lambda s: engine_pb2_grpc.add_EngineServicer_to_server(fake, s),
                                 service_names=["kvmesh.v1.Engine"], port=port)
    return running, f"127.0.0.1:{port}"


async def _until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_response_record_names_enums():
    resp = router_pb2.RouterGenerateResponse(
        request_id="r", text="x", finish_reason=common_pb2.FINISH_REASON_ERROR,
        error=common_pb2.StreamError(code=14, message="m", reason=common_pb2.ERROR_REASON_ENGINE_LOST))
    rec = cli.response_record(resp)
    assert rec["finish_reason"] == "ERROR" and rec["error"] == {"code": "UNAVAILABLE", "message": "m",
                                                                "reason": "ENGINE_LOST"}
