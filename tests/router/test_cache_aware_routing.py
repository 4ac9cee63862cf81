"""Cache-aware routing on real processes: a router with --policy cache_aware over the three
stories260k engines (a: 96 blocks, b: 48, c: 48), 8 conversation prefixes, 200 requests.

- Uniform traffic: the requests of one prefix land on the replica that holds it (after the first
  one, which decides where the prefix lives), and the prefixes are spread over the replicas.
- One hot prefix (60% of the traffic): it does not pin its replica; the load still spreads (a second
  replica computes the prefix once and then shares its traffic).
The engines' KV events feed the router's index: the test checks the router followed them.
"""

from __future__ import annotations

import asyncio
import collections
import random

import grpc
import pytest

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.router.client import engine_load, engines_idle, generate, greedy, wait_replicas

NAMES = ["a", "b", "c"]
NUM_PREFIXES = 8
PREFIX_TOKENS = 128  # 8 blocks of 16: a short system prompt
CONCURRENCY = 8
MAX_TOKENS = 8


def _prefix(i: int) -> list[int]:
    return [1] + [(37 * i + 11 * k) % 480 + 20 for k in range(PREFIX_TOKENS - 1)]


@pytest.fixture(scope="module")
def router(mesh):
    return mesh.router(NAMES, "--policy", "cache_aware")


async def _run(stub, prefixes: list[int], rng: random.Random, ids: dict[str, str], served: list) -> None:
    """Send one request per entry of `prefixes` (that prefix + a fresh user turn), CONCURRENCY at a
    time; appends (prefix, engine name, cached prompt tokens) to `served` as they finish."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(p: int) -> None:
        turn = [rng.randrange(20, 500) for _ in range(rng.randrange(4, 12))]
        req = router_pb2.RouterGenerateRequest(token_ids=common_pb2.TokenIds(ids=_prefix(p) + turn),
                                               sampling=greedy(MAX_TOKENS, ignore_eos=True))
        async with sem:
            result = await generate(stub, req)
        assert result.status == grpc.StatusCode.OK, result.details
        served.append((p, ids[result.engine_id], result.last.usage.cached_prompt_tokens))

    await asyncio.gather(*(one(p) for p in prefixes))


def _on_holder(served) -> int:
    """Requests served by an engine that had served their prefix before (so it held it)."""
    seen, n = set(), 0
    for p, engine, _ in served:
        n += (p, engine) in seen
        seen.add((p, engine))
    return n


async def test_same_prefix_lands_on_its_replica_and_a_hot_prefix_spreads(mesh, router):
    addresses = [mesh.engines[n].address for n in NAMES]
    await engines_idle(addresses)
    ids = {(await engine_load(a)).engine_id: n for n, a in zip(NAMES, addresses)}
    rng = random.Random(7)
    first, uniform, hot = [], [], []
    async with create_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_replicas(stub, len(NAMES))
        # Each prefix's first request decides where it lives; then 100 uniform requests.
        await _run(stub, list(range(NUM_PREFIXES)), rng, ids, first)
        await _run(stub, [rng.randrange(NUM_PREFIXES) for _ in range(100)], rng, ids, uniform)
        # A hot prefix: 60% of the next 92 requests.
        await _run(stub, [0 if rng.random() < 0.6 else rng.randrange(1, NUM_PREFIXES) for _ in range(92)],
                   rng, ids, hot)

    homes = {p: engine for p, engine, _ in first}
    print(f"homes {homes}; uniform: {_on_holder(first + uniform)}/{len(uniform)} on a holder, "
          f"{collections.Counter((p, e) for p, e, _ in uniform)}")
    assert len(set(homes.values())) >= 2, homes  # the prefixes are spread over the replicas
    assert _on_holder(first + uniform) >= 0.9 * len(uniform)
    # The engines confirm it: nearly every uniform request found its prefix cached.
    hits = sum(cached >= PREFIX_TOKENS - 16 for _, _, cached in uniform)
    assert hits >= 0.9 * len(uniform), hits

    per_engine = collections.Counter(engine for _, engine, _ in hot)
    hot_engines = collections.Counter(engine for p, engine, _ in hot if p == 0)
    print(f"hot phase: per engine {dict(per_engine)}, hot prefix on {dict(hot_engines)}")
    assert len(hot_engines) >= 2, hot_engines  # the hot prefix did not pin one replica
    assert max(per_engine.values()) <= 0.75 * len(hot), per_engine
    assert _on_holder(first + uniform + hot) - _on_holder(first + uniform) >= 0.8 * len(hot)

    loads = await engines_idle(addresses)
    assert all(r.in_use_blocks == 0 for r in loads.values())
