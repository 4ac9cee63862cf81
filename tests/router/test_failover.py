"""An engine killed (SIGKILL) mid-burst: requests that had no token yet finish on the other engine,
invisibly; requests already streaming from it end with one UNAVAILABLE StreamError (ENGINE_LOST);
the router keeps serving; the engine, restarted on its address, is admitted again.

Evidence of the invisible failover comes from the router's pick counter (/metrics): every dispatch
to an engine counts, so picks of the killed engine beyond the streams the clients saw it serve are
requests that moved to the other engine before their first token.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.ports import free_port
from tests.router.client import Result, engine_load, engines_idle, generate, greedy, wait_replicas

NAMES = ["b", "c"]  # 48 blocks each
N = 10
PROMPT = [1] + [300 + i % 100 for i in range(399)]  # 400 tokens = 25 blocks: one running at a time


def burst_prompt(i: int) -> list[int]:
    """PROMPT with a second token of its own: no two requests of the burst share a cached block, so the
    prefix cache cannot let several run at once on one engine (the same prompt did, once the first's
    blocks were cached: all of the victim's requests then had a token at the kill and none moved)."""
    return [PROMPT[0], 200 + i, *PROMPT[2:]]
MAX_TOKENS = 100


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(autouse=True)
def victim_revived(mesh):
    """Engine b runs again after the test whatever its outcome: later modules share the mesh (a failure
    before the test's own restart left them a dead engine and failed them too)."""
    yield
    if mesh.engines["b"].proc.poll() is not None:
        mesh.restart_engine("b")


@pytest.fixture(scope="module")
def router(mesh, metrics_port):
    # Let engines queue up to 10x their blocks: long prompts wait at each engine, and the survivor
    # can take the whole burst after the kill.
    return mesh.router(NAMES, "--queue-ratio", "10", "--metrics-port", str(metrics_port))


def _picks(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'^kvmesh:router_picks_total\{engine_id="([^"]+)"\} (\S+)$',
                                                  text, re.M)}


async def _stream(stub, req, seen: list, i: int) -> Result:
    """Like client.generate, but records the engine of each stream as soon as its first response arrives."""
    result = Result()
    try:
        async for resp in stub.Generate(req, timeout=120):
            result.responses.append(resp)
            if resp.engine_id:
                seen[i] = resp.engine_id
    except grpc.aio.AioRpcError as exc:
        result.status, result.details = exc.code(), exc.details()
    return result


async def test_kill_mid_burst_failover_stream_error_and_readmission(mesh, router, metrics_port):
    victim, survivor = mesh.engines["b"], mesh.engines["c"]
    victim_id = (await engine_load(victim.address)).engine_id
    survivor_id = (await engine_load(survivor.address)).engine_id
    await engines_idle([victim.address, survivor.address])
    picks_before = _picks(metrics_port)
    reqs = [router_pb2.RouterGenerateRequest(token_ids=common_pb2.TokenIds(ids=burst_prompt(i)),
                                             sampling=greedy(MAX_TOKENS, ignore_eos=True), return_tokens=True)
            for i in range(N)]
    async with create_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_replicas(stub, 2)
        seen = [""] * N
        tasks = [asyncio.create_task(_stream(stub, reqs[i], seen, i)) for i in range(N)]
        for _ in range(1200):  # kill as soon as a stream from the victim has begun
            if victim_id in seen:
                break
            await asyncio.sleep(0.005)
        assert victim_id in seen, "no request reached the victim engine"
        victim.kill()
        results = await asyncio.gather(*tasks)

        lost = [r for r in results if r.last.HasField("error")]
        assert lost, "the kill should have cut at least one stream"
        for r in results:
            assert r.status == grpc.StatusCode.OK, r.details  # never a bare status after the first token
            if r.last.HasField("error"):
                err = r.last.error
                assert r.engine_id == victim_id and r.token_ids, r.engine_id
                assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE.value[0],
                                                  common_pb2.ERROR_REASON_ENGINE_LOST)
                assert "lost" in err.message and r.last.finish_reason == common_pb2.FINISH_REASON_ERROR
                assert sum(x.HasField("error") for x in r.responses) == 1
            else:
                assert r.last.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(r.token_ids) == MAX_TOKENS
        # Dispatches to the victim beyond the streams it served moved to the survivor invisibly.
        picks = _picks(metrics_port)
        victim_picks = picks.get(victim_id, 0) - picks_before.get(victim_id, 0)
        served_by_victim = sum(r.engine_id == victim_id for r in results)
        moved = victim_picks - served_by_victim
        print(f"kill mid-burst: {len(lost)} streams cut, {moved:.0f} moved before their first token")
        assert moved >= 1, (victim_picks, served_by_victim)
        assert sum(r.engine_id == survivor_id and not r.last.HasField("error") for r in results) == N - len(lost)

        # The router keeps serving, on the survivor alone.
        after = await generate(stub, router_pb2.RouterGenerateRequest(text="The dog ran", sampling=greedy(8)))
        assert after.status == grpc.StatusCode.OK and after.engine_id == survivor_id
        models = await stub.ListModels(router_pb2.ListModelsRequest())
        assert models.models[0].num_ready_replicas == 1

        # Restarted on the same address, the engine is admitted again and gets traffic.
        restarted = await asyncio.to_thread(mesh.restart_engine, "b")
        new_id = (await engine_load(restarted.address)).engine_id
        await wait_replicas(stub, 2, timeout_s=60)
        small = router_pb2.RouterGenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT[:16]),
                                                 sampling=greedy(8))
        burst = await asyncio.gather(*(generate(stub, small) for _ in range(12)))
        assert {r.status for r in burst} == {grpc.StatusCode.OK}
        assert new_id in {r.engine_id for r in burst}
