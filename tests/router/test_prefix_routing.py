"""The router's prefix index (events and the approximate index of its own decisions) and the
cache-aware policy, on hand-made candidates and batches: exact matches, scores and fallbacks."""

from __future__ import annotations

import collections
import random

import pytest
from test_policy import cand

from kvmesh.prefix_hash import prompt_block_hashes
from kvmesh.v1 import engine_pb2
from router.kv_events import _SequenceGap, apply_batch
from router.policy import TIER_FRESH_FITS, TIER_FRESH_QUEUES, CacheAwarePolicy, PromptKey, make_policy
from router.prefix_index import SOURCE_EVENTS, SOURCE_NONE, SOURCE_ROUTED, PrefixIndex

BS = 16
SYSTEM = list(range(100, 164))  # 4 blocks


def batch(seq, stored=(), removed=(), snapshot=False, engine_id="e1") -> engine_pb2.KvEventBatch:
    b = engine_pb2.KvEventBatch(engine_id=engine_id, sequence=seq, snapshot=snapshot, block_size=BS)
    if stored:
        b.events.add().stored.block_hashes.extend(stored)
    if removed:
        b.events.add().removed.block_hashes.extend(removed)
    return b


def test_events_index_matches_leading_blocks_only():
    index = PrefixIndex()
    h = prompt_block_hashes(SYSTEM + [1, 2], BS)
    rep = index.replica("a")
    apply_batch(rep, batch(5, stored=h[:2], snapshot=True), now=10.0)
    apply_batch(rep, batch(6, stored=h[3:]), now=10.1)  # block 2 missing: block 3 cannot be used
    assert index.match("a", h, now=10.2) == (2, SOURCE_EVENTS)
    apply_batch(rep, batch(7, removed=h[:1]), now=10.3)
    assert index.match("a", h, now=10.4) == (0, SOURCE_EVENTS)
    apply_batch(rep, batch(7), now=10.5)  # heartbeat
    assert rep.last_event_at == 10.5
    with pytest.raises(_SequenceGap):
        apply_batch(rep, batch(9, stored=h), now=11.0)
    apply_batch(rep, batch(0, stored=h, snapshot=True, engine_id="e2"), now=11.1)  # restarted engine
    assert index.match("a", h, now=11.2) == (4, SOURCE_EVENTS)


def test_stale_or_lost_events_fall_back_to_the_routers_own_decisions():
    index = PrefixIndex(staleness_s=2.0, pending_s=5.0, approx_ttl_s=60.0)
    h = prompt_block_hashes(SYSTEM, BS)
    rep = index.replica("a")
    apply_batch(rep, batch(1, snapshot=True), now=0.0)
    index.note_routed("a", h[:3], now=0.5)
    # Fresh events: what the router just sent counts as held for pending_s (stored event in flight).
    assert index.match("a", h, now=1.0) == (3, SOURCE_EVENTS)
    apply_batch(rep, batch(1), now=6.0)
    assert index.match("a", h, now=6.0) == (0, SOURCE_EVENTS)  # events say no, pending expired
    # No heartbeat for longer than the staleness bound: the approximate index answers.
    assert index.match("a", h, now=9.0) == (3, SOURCE_ROUTED)
    rep.events_lost()
    assert index.match("a", h, now=6.1) == (3, SOURCE_ROUTED)
    assert index.match("a", h, now=61.0) == (0, SOURCE_ROUTED)  # beyond approx_ttl_s
    rep.prefix_caching = False
    assert index.match("a", h, now=6.1) == (0, SOURCE_NONE)


def test_routed_index_is_bounded_lru():
    index = PrefixIndex()
    rep = index.replica("a")
    rep.capacity = 4
    h1, h2 = prompt_block_hashes(SYSTEM, BS), prompt_block_hashes(list(range(64)), BS)
    index.note_routed("a", h1, now=1.0)
    index.note_routed("a", h2[:2], now=2.0)
    assert list(rep.routed) == h1[2:] + h2[:2]
    assert index.match("a", h1, now=3.0)[0] == 0 and index.match("a", h2, now=3.0)[0] == 2


def _policy(**kw) -> CacheAwarePolicy:
    return CacheAwarePolicy(PrefixIndex(), **kw)


def _holding(policy, address, hashes):
    rep = policy.index.replica(address)
    apply_batch(rep, batch(1, stored=hashes, snapshot=True), now=0.0)
    rep.last_event_at = float("inf")  # always fresh


def test_score_counts_the_hit_free_blocks_after_and_queue_balance():
    policy = _policy()
    h = prompt_block_hashes(SYSTEM, BS)  # the policy hashes prompt[:-1]: 65 tokens -> 4 blocks
    _holding(policy, "b", h[:2])
    prompt = PromptKey(SYSTEM + [7])
    a, b = cand("a", 100, total=100), cand("b", 100, total=100, in_flight=1)
    d = policy.choose("r", [a, b], 65, 31, random.Random(0), prompt)  # need 6 blocks
    sa, sb = d.scored
    # a: no hit, free after 94/100, least busy.
    assert (sa.matched_blocks, sa.need_blocks, sa.score, sa.prefix_source) == (0, 6, 0.25 * 0.94, SOURCE_ROUTED)
    # b: half the prompt cached, 4 new blocks (free after 96), one request busier: 1/4 off.
    assert (sb.matched_blocks, sb.new_blocks, sb.prefix_source) == (2, 4, SOURCE_EVENTS)
    assert sb.score == round(0.5 + 0.25 * 0.96 - 0.25, 6)
    assert d.chosen == "b" and d.reserve_blocks == 4 and d.reason.startswith(TIER_FRESH_FITS)
    attrs = d.attributes()
    assert attrs["kvmesh.route.matched_blocks"] == [0, 2]
    assert attrs["kvmesh.route.prefix_sources"] == [SOURCE_ROUTED, SOURCE_EVENTS]
    assert attrs["kvmesh.route.in_flight"] == [0, 1]
    # The decision fed the approximate index: the prompt's blocks are now "routed" to b.
    assert list(policy.index.replica("b").routed) == h


def test_hot_prefix_moves_only_when_its_engine_is_busier_by_balance_requests():
    policy = _policy()
    _holding(policy, "b", prompt_block_hashes(SYSTEM, BS))
    prompt = PromptKey(SYSTEM + [7])
    for in_flight_b, want in ((3, "b"), (5, "a")):  # a whole hit is worth 4 requests of imbalance
        policy.index.replica("b").routed.clear()
        d = policy.choose("r", [cand("a", 100), cand("b", 100, in_flight=in_flight_b)], 65, 31,
                          random.Random(0), prompt)
        assert d.chosen == want, (in_flight_b, [s.score for s in d.scored])


def test_no_prompt_or_opt_out_scores_like_load_alone():
    policy = _policy()
    d = policy.choose("r", [cand("a", 50), cand("b", 80)], 10, 10, random.Random(0), None)
    assert d.chosen == "b" and all(s.matched_blocks == 0 for s in d.scored)
    assert not policy.index.replicas.get("b") or not policy.index.replicas["b"].routed


def test_queueing_engines_still_prefer_the_cached_prefix():
    policy = _policy()
    h = prompt_block_hashes(SYSTEM, BS)
    policy.index.note_routed("a", h)
    d = policy.choose("r", [cand("a", 2, total=100), cand("b", 2, total=100)], 65, 31, random.Random(0),
                      PromptKey(SYSTEM + [7]))
    assert [s.tier for s in d.scored] == [TIER_FRESH_FITS, TIER_FRESH_QUEUES]
    assert d.chosen == "a"


def test_salt_separates_namespaces_and_block_sizes_hash_separately():
    policy = _policy()
    policy.index.note_routed("a", prompt_block_hashes(SYSTEM, BS, "t1"))
    policy.index.note_routed("b", prompt_block_hashes(SYSTEM, 32))
    cands = [cand("a", 100), cand("b", 100, block_size=32)]
    d = policy.choose("r", cands, 65, 31, random.Random(0), PromptKey(SYSTEM + [7], "t1"))
    assert [s.matched_blocks for s in d.scored] == [4, 0]
    d = policy.choose("r", cands, 65, 31, random.Random(0), PromptKey(SYSTEM + [7]))
    assert [s.matched_blocks for s in d.scored] == [0, 2]


def test_equal_engines_share_new_prefixes_at_random():
    policy = make_policy("cache_aware")
    picks = collections.Counter()
    for i in range(60):
        prompt = PromptKey([i] * 40)
        picks[policy.choose(f"r{i}", [cand("a", 100), cand("b", 100)], 40, 8, random.Random(i), prompt).chosen] += 1
    assert min(picks.values()) > 15
