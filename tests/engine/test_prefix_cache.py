"""Prefix caching in the block manager and the scheduler: hash chaining, exact block ids, eviction
order, admission from a hit, opt-outs. CPU only, no model (see test_prefix_cache_model.py for
stories260k)."""

from __future__ import annotations

import subprocess
import sys

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.prefix_cache import BlocksRemoved, BlocksStored
from engine_svc.core.request import FinishReason, Request
from engine_svc.core.scheduler import Scheduler
from engine_svc.sampling_params import SamplingParams
from kvmesh.prefix_hash import block_hash, prompt_block_hashes, root_hash

BS = 4


def counts(bm: BlockManager) -> tuple[int, int, int]:
    return bm.num_free_blocks, bm.num_cached_blocks, bm.num_in_use_blocks


# ---- hashing (kvmesh/prefix_hash.py, shared with the router) ----

def test_hashes_chain_over_the_parent_and_cover_full_blocks_only():
    tokens = list(range(10))  # 2 full blocks of 4 + 2 tokens
    h = prompt_block_hashes(tokens, BS)
    assert len(h) == 2
    assert h[0] == block_hash(root_hash(), [0, 1, 2, 3])
    assert h[1] == block_hash(h[0], [4, 5, 6, 7])
    # The same block after a different first block hashes differently: a hash names the prefix.
    other = prompt_block_hashes([9, 1, 2, 3, 4, 5, 6, 7], BS)
    assert other[0] != h[0] and other[1] != h[1]
    # A longer prompt with the same start extends the same chain.
    assert prompt_block_hashes(tokens + [10, 11], BS)[:2] == h
    # The salt is a namespace: nothing matches across salts.
    salted = prompt_block_hashes(tokens, BS, cache_salt="tenant-a")
    assert not set(salted) & set(h)
    assert prompt_block_hashes(tokens, BS, cache_salt="tenant-a") == salted
    assert all(0 <= x < 2 ** 64 for x in h + salted)


def test_hashes_are_stable_across_processes_and_pinned():
    """Router and engine run in different processes (and PYTHONHASHSEEDs): the value is fixed."""
    code = "from kvmesh.prefix_hash import prompt_block_hashes as p; print(p(list(range(8)), 4))"
    values = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""},
                             capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert values == {f"{prompt_block_hashes(list(range(8)), 4)}\n"}
    # Pinned: a change of scheme must bump prefix_hash.VERSION (old routers and engines never match).
    assert root_hash("") == 0xE48E2EA7FD866065
    assert prompt_block_hashes([1, 2, 3, 4], 4) == [0x6C16276F6C47634F]


# ---- block manager: exact ids ----

def _tokens(seq):
    return lambda a, b: list(seq[a:b])


def _admit(bm: BlockManager, rid: str, seq: list[int]) -> list[int]:
    """What the scheduler does for a new request: look up, take the hit, allocate the rest, and
    (as if the step computed everything) make the full blocks findable. Returns the hit's ids."""
    hashes = prompt_block_hashes(seq, BS)
    hit = bm.lookup(hashes, _tokens(seq), len(seq))
    bm.take_prefix(rid, hit)
    assert bm.allocate(rid, len(seq)) is not None
    bm.cache_blocks(rid, hashes, len(seq) // BS, _tokens(seq))
    bm.check()
    return hit.block_ids


def test_hit_shares_full_blocks_and_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = list(range(1, 11))  # blocks [0, 1] full, block 2 partial
    assert _admit(bm, "a", a) == []
    assert bm.block_table("a") == [0, 1, 2]
    b = a[:8] + [50, 51, 52]
    assert _admit(bm, "b", b) == [0, 1]  # shared read-only
    assert bm.block_table("b") == [0, 1, 3]
    assert counts(bm) == (6, 0, 4)
    # Exactly 8 tokens (2 full blocks) cached: the cap leaves the last token, so only block 0 is hit.
    assert _admit(bm, "c", a[:8]) == [0]
    assert bm.block_table("c") == [0, 4]


def test_release_makes_hashed_blocks_cached_tail_first_and_evicts_lru():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = list(range(1, 13))  # 3 full blocks: [0, 1, 2]
    _admit(bm, "a", a)
    b = list(range(101, 106))  # 1 full + 1 partial: [3, 4]
    _admit(bm, "b", b)
    assert bm.free("a") == 3 and bm.free("b") == 2
    # a's blocks are cached (hashed), released tail first: LRU order 2, 1, 0, then b's full block 3.
    # b's partial block 4 had no hash: straight to the free list.
    assert counts(bm) == (2, 4, 0)
    assert list(bm._cached) == [2, 1, 0, 3]
    # A new 5-block sequence takes the free blocks [5, 4] first, then evicts 2, 1, 0 in LRU order.
    got = bm.allocate("c", 20).new_block_ids
    assert got == [5, 4, 2, 1, 0]
    assert counts(bm) == (0, 1, 5)
    # a's prefix is gone (block 0 evicted), b's first block still hits.
    assert bm.lookup(prompt_block_hashes(a, BS), _tokens(a), len(a)).block_ids == []
    assert bm.lookup(prompt_block_hashes(b, BS), _tokens(b), len(b)).block_ids == [3]
    bm.check()


def test_a_cached_block_taken_again_is_in_use_until_its_last_user_releases_it():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    p = list(range(1, 9)) + [0]
    _admit(bm, "a", p)
    bm.free("a")
    assert counts(bm) == (4, 2, 0)
    assert _admit(bm, "b", p) == [0, 1]
    assert _admit(bm, "c", p) == [0, 1]
    assert counts(bm) == (2, 0, 4)  # blocks 0, 1 shared by b and c, one own block each
    bm.free("b")
    assert counts(bm) == (3, 0, 3)  # still used by c
    bm.free("c")
    assert counts(bm) == (4, 2, 0)
    bm.check()


def test_same_prefix_computed_twice_keeps_one_hash_and_frees_the_copy():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    p = list(range(1, 6))
    h = prompt_block_hashes(p, BS)
    for rid in ("a", "b"):  # admitted in the same step: neither finds the other's block yet
        bm.take_prefix(rid, bm.lookup(h, _tokens(p), len(p)))
        bm.allocate(rid, len(p))
    bm.cache_blocks("a", h, 1, _tokens(p))
    bm.cache_blocks("b", h, 1, _tokens(p))
    assert bm.num_hashed_blocks == 1
    bm.free("b")
    bm.free("a")
    assert counts(bm) == (5, 1, 0)  # b's copy went to the free list
    bm.check()


def test_token_ids_are_compared_on_a_hit():
    """A forged hash collision (same hash, other tokens) is not a hit."""
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    p = list(range(1, 6))
    _admit(bm, "a", p)
    forged = [9, 9, 9, 9, 5]
    assert bm.lookup(prompt_block_hashes(p, BS), _tokens(forged), len(forged)).block_ids == []


def test_caching_off_never_hits_and_frees_everything():
    bm = BlockManager(num_blocks=4, block_size=BS)
    p = list(range(1, 10))
    _admit(bm, "a", p)
    bm.free("a")
    assert counts(bm) == (4, 0, 0)
    assert _admit(bm, "b", p) == []


def test_events_record_stores_and_evictions_in_order():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=True)
    events = bm.enable_events()
    p = list(range(1, 10))
    h = prompt_block_hashes(p, BS)
    _admit(bm, "a", p)
    bm.free("a")
    bm.allocate("b", 12)  # free block 2, then evicts 1 (a's tail) and then 0
    kinds = [(type(e).__name__, e.block_hashes) for e in events]
    assert kinds == [("BlocksStored", tuple(h)), ("BlocksRemoved", (h[1],)), ("BlocksRemoved", (h[0],))]
    assert isinstance(events[0], BlocksStored) and events[0].parent_hash == root_hash()
    assert isinstance(events[1], BlocksRemoved)
    assert bm.cached_hashes() == []


# ---- the scheduler's admission ----

def _req(rid: str, prompt: list[int], max_tokens: int = 4, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), **kw)


def _finish_prefill(sched: Scheduler) -> list:
    """Schedule one step and pretend the model computed it (the engine core's bookkeeping)."""
    out = sched.schedule()
    for req, seq in zip(out.requests, out.seqs):
        req.num_computed_tokens += len(seq.new_token_ids)
    return out


def test_admission_starts_after_the_cached_prefix():
    sched = Scheduler(BlockManager(16, BS, enable_prefix_caching=True), 64, 8)
    system = list(range(1, 13))  # 3 full blocks
    a = _req("a", system + [20, 21])
    sched.add(a)
    out = _finish_prefill(sched)
    assert out.seqs[0].start_pos == 0 and len(out.seqs[0].new_token_ids) == 14
    b = _req("b", system + [30])
    sched.add(b)
    out = _finish_prefill(sched)  # a's blocks became findable at the start of this schedule()
    seq_b = out.seqs[-1]
    assert seq_b.request_id == "b" and seq_b.start_pos == 12 and seq_b.new_token_ids == [30]
    assert seq_b.block_ids[:3] == sched.bm.block_table("a")[:3]
    assert b.num_cached_tokens == 12 and a.num_cached_tokens == 0
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (14 + 13, 12)
    sched.bm.check()


def test_salt_and_opt_out_isolate_requests():
    sched = Scheduler(BlockManager(16, BS, enable_prefix_caching=True), 64, 8)
    p = list(range(1, 10))
    sched.add(_req("a", p))
    _finish_prefill(sched)
    others = [_req("salted", p, cache_salt="t1"), _req("bypass", p, use_prefix_cache=False), _req("same", p)]
    for r in others:
        sched.add(r)
    out = _finish_prefill(sched)
    starts = {s.request_id: s.start_pos for s in out.seqs if s.request_id != "a"}
    assert starts == {"salted": 0, "bypass": 0, "same": 8}
    # The bypass request leaves nothing findable behind; the salted one only under its own salt.
    before = sched.bm.num_hashed_blocks
    for r in others[:2]:
        sched.finish(r, FinishReason.CANCELLED)
    assert sched.bm.num_hashed_blocks == before + 2  # only "salted"'s 2 full blocks
    sched.bm.check()


def test_admission_counts_evictable_hit_blocks_against_the_pool():
    """A hit on cached blocks takes them out of the evictable pool: the fit check accounts for it."""
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    sched = Scheduler(bm, 64, 8)
    p = list(range(1, 10))  # 3 blocks: 2 full + 1
    a = _req("a", p, max_tokens=1)
    sched.add(a)
    _finish_prefill(sched)
    sched.finish(a, FinishReason.LENGTH)
    assert counts(bm) == (2, 2, 0)
    big = _req("big", p[:8] + list(range(50, 58)), max_tokens=1)  # 16 tokens = 4 blocks, 2 of them hit
    sched.add(big)
    out = _finish_prefill(sched)
    assert [s.start_pos for s in out.seqs] == [8] and bm.block_table("big")[:2] == [0, 1]
    assert counts(bm) == (0, 0, 4)
    bm.check()
