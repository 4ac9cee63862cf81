"""Replica choice and pending blocks, on hand-made candidates: exact scores, tiers and spreads."""

from __future__ import annotations

import collections
import random

import pytest

from router.policy import (TIER_FRESH_FITS, TIER_FRESH_QUEUES, TIER_FULL, TIER_STALE_FITS, Candidate,
                           KvAwarePolicy, LeastRequestsPolicy, RoundRobinPolicy, make_policy)
from router.pending import PendingLedger


def cand(address, free, *, total=None, block_size=16, cached=0, reserved=0, waiting=0, pending=0,
         in_flight=0, age=0.1, stale=False) -> Candidate:
    return Candidate(address=address, engine_id=f"id-{address}", block_size=block_size,
                     total_blocks=total if total is not None else free, free_blocks=free, cached_blocks=cached,
                     reserved_blocks=reserved, waiting_tokens=waiting, pending_blocks=pending,
                     in_flight=in_flight, report_age_s=age, stale=stale)


def test_score_subtracts_every_promise_and_the_need():
    c = cand("a", free=100, total=200, cached=10, reserved=20, waiting=33, pending=7)
    # waiting 33 tokens -> 3 blocks; need (30 + 20) tokens -> 4 blocks
    d = KvAwarePolicy().choose("r", [c], num_prompt_tokens=30, max_tokens=20, rng=random.Random(0))
    s = d.scored[0]
    assert (s.need_blocks, s.score, s.tier) == (4, 100 + 10 - 20 - 3 - 7 - 4, TIER_FRESH_FITS)
    assert d.chosen == "a"


def test_most_free_wins_and_ties_break_at_random():
    policy = KvAwarePolicy()
    d = policy.choose("r", [cand("a", 50), cand("b", 80), cand("c", 60)], 10, 10, random.Random(0))
    assert d.chosen == "b" and d.reason.startswith(TIER_FRESH_FITS)
    picks = collections.Counter(policy.choose("r", [cand("a", 50), cand("b", 50)], 10, 10, random.Random(i)).chosen
                                for i in range(200))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 60


def test_stale_engine_only_when_no_fresh_one_fits():
    policy = KvAwarePolicy()
    fresh_small = cand("fresh", free=10, total=100)
    stale_big = cand("stale", free=90, total=100, age=5.0, stale=True)
    d = policy.choose("r", [fresh_small, stale_big], 16, 16, random.Random(0))  # need 2 blocks: fresh fits
    assert d.chosen == "fresh"
    d = policy.choose("r", [fresh_small, stale_big], 16 * 10, 16 * 10, random.Random(0))  # need 20
    assert d.chosen == "stale" and [s.tier for s in d.scored] == [TIER_FRESH_QUEUES, TIER_STALE_FITS]


def test_queueing_allowance_then_overload():
    policy = KvAwarePolicy(queue_ratio=0.5)
    full = cand("a", free=0, total=100, pending=40)
    d = policy.choose("r", [full], 16 * 5, 16 * 5, random.Random(0))  # score -50: at the allowance
    assert d.chosen == "a" and (d.scored[0].tier, d.scored[0].score) == (TIER_FRESH_QUEUES, -0.5)
    full.pending_blocks = 41
    d = policy.choose("r", [full], 16 * 5, 16 * 5, random.Random(0))
    assert d.chosen is None and d.scored[0].tier == TIER_FULL
    assert d.reason == "no engine can admit the request"
    assert KvAwarePolicy().choose("r", [], 1, 1, random.Random(0)).reason == "no ready engine"


def test_request_larger_than_an_engine_never_goes_there():
    d = KvAwarePolicy(queue_ratio=10).choose("r", [cand("small", 8), cand("big", 4, total=64)], 16 * 9, 16,
                                             random.Random(0))
    assert d.chosen == "big" and d.scored[0].tier == TIER_FULL


def simulate_burst(free: dict[str, int], num_requests: int, need_tokens: int, *, use_ledger: bool,
                   seed: int = 0, queue_ratio: float = 1.0) -> collections.Counter:
    """A burst dispatched between two reports: the view of `free` never changes, only the ledgers."""
    policy, rng = KvAwarePolicy(queue_ratio=queue_ratio), random.Random(seed)
    ledgers = {a: PendingLedger() for a in free}
    counts = collections.Counter()
    for i in range(num_requests):
        cands = [cand(a, f, pending=ledgers[a].pending_blocks if use_ledger else 0) for a, f in free.items()]
        d = policy.choose(f"r{i}", cands, need_tokens, 0, rng)
        ledgers[d.chosen].add(f"r{i}", d.chosen_candidate.need_blocks(need_tokens, 0))
        counts[d.chosen] += 1
    return counts


def test_burst_after_a_report_does_not_herd():
    counts = simulate_burst({"a": 101, "b": 100, "c": 100}, 60, 32, use_ledger=True)
    assert max(counts.values()) <= 21, counts
    # Without the pending blocks every request goes to the engine that looked emptiest.
    assert simulate_burst({"a": 101, "b": 100, "c": 100}, 60, 32, use_ledger=False) == {"a": 60}


def test_burst_follows_free_blocks_on_unequal_engines():
    free = {"big": 200, "mid": 100, "small": 50}
    counts = simulate_burst(free, 64, 80, use_ledger=True)  # 5 blocks each: 320 of 350 blocks
    total = sum(free.values())
    for addr, f in free.items():
        assert counts[addr] / 64 <= f / total + 0.10, counts


def test_oversubscribed_burst_queues_in_proportion_to_capacity():
    free = {"big": 96, "mid": 48, "small": 24}
    counts = simulate_burst(free, 56, 160, use_ledger=True, queue_ratio=4)  # 10 blocks each: 560 of 168
    # Equal deficits per block of capacity: 32 / 16 / 8, give or take the last request.
    assert abs(counts["big"] - 32) <= 1 and abs(counts["mid"] - 16) <= 1 and abs(counts["small"] - 8) <= 1, counts


def test_ledger_retires_pending_blocks_a_report_reflects():
    ledger = PendingLedger()
    ledger.on_report(5)
    ledger.add("x", 3)
    ledger.add("y", 4)
    assert ledger.pending_blocks == 7
    ledger.on_report(6)  # a report says nothing about requests it has not acknowledged
    assert ledger.pending_blocks == 7
    ledger.ack("x", 8)  # x's first response carried report 8
    ledger.on_report(7)
    assert ledger.pending_blocks == 7
    ledger.on_report(8)
    assert ledger.pending_blocks == 4
    ledger.ack("y", None)  # no report attached: the next report reflects it
    ledger.on_report(9)
    assert ledger.pending_blocks == 0 and len(ledger) == 0
    ledger.add("z", 2)
    ledger.ack("z", 9)  # a report already applied reflects it: retired at once
    assert ledger.pending_blocks == 0
    ledger.add("w", 2)
    ledger.ack("w", 12)
    ledger.reset()  # engine restarted: the new numbering starts again
    ledger.on_report(12)
    assert ledger.pending_blocks == 2
    ledger.release("w")
    ledger.release("w")  # idempotent
    assert ledger.pending_blocks == 0


def test_baselines():
    rng = random.Random(0)
    rr = RoundRobinPolicy()
    cands = [cand("b", 10), cand("a", 100), cand("c", 1)]
    assert [rr.choose("r", cands, 1, 1, rng).chosen for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    lr = LeastRequestsPolicy()
    cands = [cand("a", 100, in_flight=3), cand("b", 1, in_flight=1), cand("c", 50, in_flight=2)]
    assert lr.choose("r", cands, 1, 1, rng).chosen == "b"
    assert lr.choose("r", [cand("a", 1, total=1)], 100, 100, rng).chosen is None


def test_decision_attributes_are_flat_and_complete():
    d = KvAwarePolicy().choose("req-1", [cand("a", 10), cand("b", 20, stale=True, age=3)], 16, 16,
                               random.Random(0))
    attrs = d.attributes()
    assert attrs["kvmesh.route.chosen"] == "a" and attrs["kvmesh.route.candidates"] == ["a", "b"]
    assert attrs["kvmesh.route.tiers"] == [TIER_FRESH_FITS, TIER_STALE_FITS]
    assert attrs["kvmesh.route.scores"] == [8.0, 18.0]
    for value in attrs.values():
        assert isinstance(value, (str, int, float)) or (
            isinstance(value, list) and len({type(v) for v in value}) <= 1)


def test_make_policy_names():
    assert make_policy("kv", queue_ratio=0.3).queue_ratio == 0.3
    assert isinstance(make_policy("round_robin"), RoundRobinPolicy)
    with pytest.raises(ValueError, match="use one of"):
        make_policy("random")
