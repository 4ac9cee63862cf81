"""The router's shared DetokenizeSessions stream (router.detokenize_sessions) against a real
tokenizer server on loopback: concurrent sessions gathered into few messages, one session's
refusal leaving the others alone, the stream lost mid-flight (in-flight sessions fail with
UNAVAILABLE, new ones get a new stream), deadlines, cancels; and a real mesh router using it.

Oracle: the tokenizer's one-shot Detokenize, and a router on per-request DetokenizeStreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
import pytest

from kvmesh.serving.channels import create_channel
from kvmesh.serving.errors import ServiceError
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from router.detokenize_sessions import DetokenizeSessions
from tests.router.client import engines_idle, generate, greedy, wait_replicas
from tokenizer_svc import service as tokenizer_service
from tokenizer_svc.limits import TokenizerLimits
from tokenizer_svc.loader import load_tokenizer
from tokenizer_svc.server import serve_tokenizer

TEXTS = [f"Tom {i} saw a 🐸 and said \"héllo 中文\"{'!' * i} Then they went home." for i in range(40)]
GATE_ID = 7  # a batch holding this id waits at the tokenizer until the test opens the gate


@pytest.fixture(scope="module")
def stories_tok(stories260k_dir):
    return load_tokenizer(str(stories260k_dir))


class GatedTables:
    """Records the tokenizer's session tables and holds any message carrying GATE_ID until opened."""

    def __init__(self, monkeypatch):
        self.tables = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = asyncio.Event()
        gated = self
        base = tokenizer_service.SessionTable

        class Table(base):
            def __init__(self, *args):
                super().__init__(*args)
                gated.tables.append(self)

        monkeypatch.setattr(tokenizer_service, "SessionTable", Table)
        original = tokenizer_service.TokenizerServicer.DetokenizeSessions

        async def DetokenizeSessions(servicer, request_iterator, context):
            async def gated_requests():
                async for request in request_iterator:
                    if any(GATE_ID in inp.token_ids for inp in request.inputs):
                        gated.held.set()
                        await gated.gate.wait()
                    yield request
            async for response in original(servicer, gated_requests(), context):
                yield response

        monkeypatch.setattr(tokenizer_service.TokenizerServicer, "DetokenizeSessions", DetokenizeSessions)


@pytest.fixture
async def served(stories_tok, monkeypatch):
    """(start, gated): start(port=0) serves the real tokenizer and returns (running, executor)."""
    gated = GatedTables(monkeypatch)
    servers = []

    async def start(port=0):
        running, executor = await serve_tokenizer(stories_tok, TokenizerLimits(), port=port)
        servers.append((running, executor))
        return running

    yield start, gated
    for running, executor in servers:
        await running.stop(0)
        executor.shutdown()


@contextlib.asynccontextmanager
async def sessions_on(port):
    async with create_channel(f"127.0.0.1:{port}") as channel:
        sessions = DetokenizeSessions(tokenizer_pb2_grpc.TokenizerStub(channel))
        try:
            yield sessions, tokenizer_pb2_grpc.TokenizerStub(channel)
        finally:
            await sessions.close()


def request(stop=()):
    return router_pb2.RouterGenerateRequest(stop=stop)


async def test_concurrent_sessions_gather_into_few_messages_and_match_detokenize(served, stories_tok):
    start, gated = served
    running = await start()
    encode = stories_tok.text_tokenizer.encode
    rng = random.Random(0)

    async def run(sessions, text):
        ids = encode(text, add_special_tokens=False).ids
        session = sessions.session(timeout=30)
        await session.start([1], request())
        out = []
        i = 0
        while i < len(ids):  # batches of 1 to 3 ids, as engine responses gather in the inbox
            n = rng.randint(1, 3)
            update = await session.push(ids[i:i + n])
            assert "\ufffd" not in update.text and update.num_tokens == min(i + n, len(ids))
            out.append(update.text)
            i += n
        out.append((await session.finish()).text)
        assert session.done
        await session.close()
        return "".join(out)

    async with sessions_on(running.port) as (sessions, _):
        assert await asyncio.gather(*(run(sessions, t) for t in TEXTS)) == TEXTS
        stream = sessions.stream()
        # 40 sessions stepping together: each message carries many sessions' inputs.
        assert stream.num_inputs >= 4 * stream.num_messages, (stream.num_inputs, stream.num_messages)
    assert len(gated.tables) == 1 and len(gated.tables[0]) == 0  # one stream; every session closed


async def test_opens_with_long_prompts_are_split_across_messages(served, stories_tok, monkeypatch):
    from router import detokenize_sessions
    monkeypatch.setattr(detokenize_sessions, "MESSAGE_BUDGET_BYTES", 1000)
    start, _ = served
    running = await start()
    prompt = stories_tok.text_tokenizer.encode(" ".join(TEXTS[:8])).ids  # a few hundred ids: ~600 bytes an open
    ids = stories_tok.text_tokenizer.encode(" and then", add_special_tokens=False).ids
    async with sessions_on(running.port) as (sessions, _):
        batch = [sessions.session(None) for _ in range(10)]
        for s in batch:
            await s.start(prompt, request())
        updates = await asyncio.gather(*(s.push(ids) for s in batch))
        decode = stories_tok.text_tokenizer.decode
        assert [u.text for u in updates] == [decode(prompt + ids)[len(decode(prompt)):]] * 10
        stream = sessions.stream()
        assert stream.num_inputs == 10 and stream.num_messages >= 5  # at most one open of ~600 bytes a message


async def test_the_last_batch_finishes_the_session_in_one_round_trip(served, stories_tok):
    start, _ = served
    running = await start()
    encode, decode = stories_tok.text_tokenizer.encode, stories_tok.text_tokenizer.decode
    ids = encode("Once upon a time, a frog said \"héllo\"", add_special_tokens=False).ids
    async with sessions_on(running.port) as (sessions, _):
        session = sessions.session(None)
        await session.start([1], request())
        update = await session.push(ids, finish=True)
        assert update.done and session.done and update.text == decode(ids)
        assert sessions.stream().num_messages == 1  # no finish message of its own
        stopped = sessions.session(None)
        await stopped.start([1], request(stop=["frog"]))
        update = await stopped.push(ids, finish=True)  # a stop match in the last batch still reports
        assert update.done and update.stop_match.stop == "frog" and update.text == "Once upon a time, a "


async def test_one_sessions_bad_id_fails_it_alone(served, stories_tok):
    start, gated = served
    running = await start()
    ids = stories_tok.text_tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    async with sessions_on(running.port) as (sessions, _):
        good, bad = sessions.session(None), sessions.session(None)
        for s in (good, bad):
            await s.start([1], request())
        results = await asyncio.gather(good.push(ids[:2]), bad.push([ids[0], 100000]), return_exceptions=True)
        assert not isinstance(results[0], BaseException) and results[0].num_tokens == 2
        err = results[1]
        assert isinstance(err, ServiceError) and err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs.token_ids[1]: id 100000 is outside the vocabulary [0, 512)" in err.message
        assert bad.done  # closed at the tokenizer: close() sends nothing
        await bad.close()
        assert (await good.push(ids[2:])).text and (await good.finish()).done
        assert sessions.stream().failure is None and len(gated.tables) == 1


async def test_stream_lost_mid_flight_fails_its_sessions_and_the_next_gets_a_new_stream(served, stories_tok):
    start, gated = served
    running = await start()
    port = running.port
    async with sessions_on(port) as (sessions, stub):
        idle, busy = sessions.session(None), sessions.session(None)
        for s in (idle, busy):
            await s.start([1], request())
        await idle.push([300])
        gated.gate.clear()
        pending = asyncio.ensure_future(busy.push([GATE_ID]))
        await asyncio.wait_for(gated.held.wait(), 10)
        await running.stop(0)  # the tokenizer goes away with busy's batch in flight
        with pytest.raises(ServiceError) as err:
            await asyncio.wait_for(pending, 10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert err.value.message.startswith("tokenizer detokenize stream failed: ")
        # The idle session's state went with the stream: it fails at once, without a message.
        with pytest.raises(ServiceError) as err:
            await idle.push([301])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        gated.gate.set()

        await start(port)  # the tokenizer is back on its port: a new session opens a new stream
        fresh = sessions.session(None)
        await fresh.start([1], request())
        for _ in range(50):  # the channel reconnects with backoff
            try:
                update = await fresh.push([300, 301])
                break
            except ServiceError:
                fresh = sessions.session(None)
                await fresh.start([1], request())
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no new stream after the tokenizer came back")
        assert update.num_tokens == 2 and (await fresh.finish()).done


async def test_deadline_while_the_tokenizer_holds_the_batch(served):
    start, gated = served
    running = await start()
    async with sessions_on(running.port) as (sessions, _):
        session = sessions.session(timeout=0.3)
        await session.start([1], request())
        gated.gate.clear()
        with pytest.raises(ServiceError) as err:
            await session.push([GATE_ID])
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await session.close()  # sends a cancel behind the held batch
        gated.gate.set()
        other = sessions.session(None)
        await other.start([1], request())
        assert (await other.push([300])).num_tokens == 1
        assert len(gated.tables[0]) == 1  # the expired session is gone, the other is open
        assert sessions.stream().failure is None


async def test_cancelled_push_closes_the_session_at_the_tokenizer(served):
    start, gated = served
    running = await start()
    async with sessions_on(running.port) as (sessions, _):
        sessions_list = [sessions.session(None) for _ in range(5)]
        for s in sessions_list:
            await s.start([1], request(stop=["zz"]))
        await asyncio.gather(*(s.push([300]) for s in sessions_list))
        assert len(gated.tables[0]) == 5
        gated.gate.clear()
        task = asyncio.ensure_future(sessions_list[0].push([GATE_ID]))
        await asyncio.wait_for(gated.held.wait(), 10)
        task.cancel()  # a client cancel while its batch is with the tokenizer
        with pytest.raises(asyncio.CancelledError):
            await task
        for s in sessions_list:
            await s.close()
        gated.gate.set()
        probe = sessions.session(None)
        await probe.start([1], request())
        await probe.push([300])  # answered after the cancels: they were applied before it
        assert len(gated.tables[0]) == 1


# A real mesh: the router uses the shared stream by default; one on per-request streams is the oracle.

@pytest.fixture(scope="module")
def routers(mesh):
    return mesh.router(["a"]), mesh.router(["a"], "--detokenize", "per-request")


async def test_mesh_router_on_the_shared_stream_matches_per_request_streams(mesh, routers):
    shared, per_request = routers
    assert "detokenization: one shared DetokenizeSessions stream" in (mesh.log_dir / f"{shared.name}.log").read_text()
    assert "detokenization: one DetokenizeStream per request" in (mesh.log_dir / f"{per_request.name}.log").read_text()
    prompts = [f"Lily had {i} red balls. She" for i in range(12)]
    stops = [["ball"], [], ["the"], ["She said"]] * 3

    async def run(router):
        async with create_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await wait_replicas(stub, 1)
            return await asyncio.gather(*(generate(stub, router_pb2.RouterGenerateRequest(
                text=p, stop=s, sampling=greedy(48, ignore_eos=True), return_tokens=True))
                for p, s in zip(prompts, stops)))

    got, expected = await run(shared), await run(per_request)
    for g, e in zip(got, expected):
        assert g.status == grpc.StatusCode.OK, g.details
        assert (g.text, g.token_ids, g.last.finish_reason, g.last.matched_stop_string) == \
            (e.text, e.token_ids, e.last.finish_reason, e.last.matched_stop_string)
    assert any(g.last.finish_reason == common_pb2.FINISH_REASON_STOP_STRING for g in got)
    (load,) = (await engines_idle([mesh.engines["a"].address])).values()
    assert load.free_blocks + load.cached_blocks == load.total_blocks and load.num_running_requests == 0


async def test_tokenizer_killed_mid_flight_through_a_real_router(mesh, tmp_path):
    """Requests streaming when the tokenizer dies end with one terminal UNAVAILABLE naming the lost
    stream (not a hang, not a bare status); the engine's blocks come back; once the tokenizer is
    back on its port, new requests work on a new shared stream."""
    from kvmesh.procs import ServiceProcess

    def tokenizer(port=0):
        return ServiceProcess("tokenizer", "tokenizer-killed", ["--model", str(mesh.model_dir)],
                              listen_port=port, log_path=str(mesh.log_dir / "tokenizer-killed.log"),
                              env={"OTEL_TRACES_EXPORTER": "none"}, die_with_parent=True).start()

    tok = tokenizer()
    tok.wait_healthy(120)
    port = tok.port
    router = mesh.router(["a"], tokenizer=tok)
    req = router_pb2.RouterGenerateRequest(text="Once upon a time", sampling=greedy(400, ignore_eos=True),
                                           return_tokens=True)
    try:
        async with create_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await wait_replicas(stub, 1)
            calls = [stub.Generate(req, timeout=60) for _ in range(3)]  # 3 x 26 blocks fit engine a
            firsts = [await call.read() for call in calls]  # every stream has begun
            assert all(f.text or f.tokens for f in firsts)
            await asyncio.to_thread(tok.kill)
            for call in calls:
                rest = []
                while (r := await call.read()) is not grpc.aio.EOF:
                    rest.append(r)
                last = rest[-1]
                assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
                assert last.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
                assert "tokenizer" in last.error.message and "detokenize stream failed" in last.error.message
                assert sum(x.HasField("error") for x in rest) == 1
            (load,) = (await engines_idle([mesh.engines["a"].address])).values()
            assert load.free_blocks + load.cached_blocks == load.total_blocks and load.num_running_requests == 0

            tok = tokenizer(port)
            await asyncio.to_thread(tok.wait_healthy, 120)
            for _ in range(100):  # the router's channel reconnects with backoff
                res = await generate(stub, router_pb2.RouterGenerateRequest(
                    text="Once upon a time", sampling=greedy(8), return_tokens=True))
                if res.status == grpc.StatusCode.OK and not res.last.HasField("error"):
                    break
                await asyncio.sleep(0.2)
            assert res.status == grpc.StatusCode.OK and len(res.token_ids) == 8 and res.text, res.details
    finally:
        tok.stop(5)
