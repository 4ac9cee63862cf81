"""Replica choice: the policy interface, the KV-aware and cache-aware policies and two baselines.

A policy sees one `Candidate` per known engine (a snapshot of the router's view: last report, its
age, the router's own pending blocks and in-flight count) and the request's size (and, for the
cache-aware policy, its prompt's token ids), and returns a `Decision` that names the engine and
records every input and score, so that the choice can be explained afterwards (it becomes a span
event; see `Decision.attributes`). Policies are pure: no I/O, no clock, randomness only through the
`rng` they are given, so they are unit-tested exactly (the cache-aware policy reads and feeds a
PrefixIndex, which keeps its own clock).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.blocks import blocks_for
from kvmesh.prefix_hash import prompt_block_hashes
from router.prefix_index import SOURCE_NONE, PrefixIndex

# Tiers of the KV-aware policy, best first: a fresh report that fits beats a stale one that fits,
# which beats queueing on a fresh engine, which beats queueing on a stale one.
TIER_FRESH_FITS = "fresh_fits"
TIER_STALE_FITS = "stale_fits"
TIER_FRESH_QUEUES = "fresh_queues"
TIER_STALE_QUEUES = "stale_queues"
TIER_FULL = "full"  # would overrun even the queueing allowance: never chosen
TIERS = (TIER_FRESH_FITS, TIER_STALE_FITS, TIER_FRESH_QUEUES, TIER_STALE_QUEUES)


@dataclass(slots=True)
class Candidate:
    """The router's view of one admissible engine (healthy, not draining, not ejected)."""

    address: str  # where the router reaches it; the key of the engine table
    engine_id: str  # from its reports
    block_size: int  # tokens per KV block
    total_blocks: int
    free_blocks: int  # as last reported
    cached_blocks: int  # evictable prefix blocks, as last reported (reusable on demand)
    reserved_blocks: int  # growth the engine already promised its running requests
    waiting_tokens: int  # prompt tokens queued at the engine, not yet holding blocks
    pending_blocks: int  # blocks the router sent there that no report reflects yet (router.pending)
    in_flight: int  # requests this router has open on the engine
    report_age_s: float  # seconds since the last report arrived
    stale: bool  # report_age_s beyond the staleness bound

    def available_blocks(self) -> int:
        """Blocks a new request could still claim: free, minus every promise the engine and the router made."""
        waiting_blocks = blocks_for(self.waiting_tokens, self.block_size)
        return (self.free_blocks + self.cached_blocks - self.reserved_blocks - waiting_blocks
                - self.pending_blocks)

    def need_blocks(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """Blocks the request holds at its largest: prompt plus growth to max_tokens."""
        return blocks_for(num_prompt_tokens + max_tokens, self.block_size)


@dataclass(slots=True)
class Scored:
    """One candidate's inputs and result in a decision."""

    candidate: Candidate
    need_blocks: int
    score: float  # higher is better; meaning depends on the policy
    tier: str
    matched_blocks: int = 0  # leading prompt blocks the engine holds in its prefix cache (cache-aware)
    prefix_source: str = SOURCE_NONE  # where matched_blocks came from (router/prefix_index.py)

    @property
    def new_blocks(self) -> int:
        """Blocks the request takes from the engine's free pool: its matched blocks are shared."""
        return self.need_blocks - self.matched_blocks


@dataclass
class Decision:
    """Why a request went where it went. `chosen` is None when no engine could take it."""

    request_id: str
    policy: str
    num_prompt_tokens: int
    max_tokens: int
    scored: list[Scored] = field(default_factory=list)
    chosen: str | None = None  # address of the chosen engine
    reason: str = ""  # one line: the rule that picked it, or why none could
    excluded: list[str] = field(default_factory=list)  # addresses skipped (failed earlier attempts)
    attempt: int = 0  # 0 = first choice, 1 = first failover, ...

    @property
    def chosen_scored(self) -> Scored | None:
        for s in self.scored:
            if s.candidate.address == self.chosen:
                return s
        return None

    @property
    def chosen_candidate(self) -> Candidate | None:
        s = self.chosen_scored
        return s.candidate if s is not None else None

    @property
    def reserve_blocks(self) -> int:
        """Blocks to reserve on the chosen engine until its reports show the request."""
        s = self.chosen_scored
        return s.new_blocks if s is not None else 0

    def attributes(self) -> dict[str, object]:
        """Flat, OpenTelemetry-compatible attributes (scalars and homogeneous lists) for a span event."""
        cands = [s.candidate for s in self.scored]
        return {
            "kvmesh.route.request_id": self.request_id,
            "kvmesh.route.policy": self.policy,
            "kvmesh.route.attempt": self.attempt,
            "kvmesh.route.chosen": self.chosen or "",
            "kvmesh.route.reason": self.reason,
            "kvmesh.route.prompt_tokens": self.num_prompt_tokens,
            "kvmesh.route.max_tokens": self.max_tokens,
            "kvmesh.route.excluded": list(self.excluded),
            "kvmesh.route.candidates": [c.address for c in cands],
            "kvmesh.route.engine_ids": [c.engine_id for c in cands],
            "kvmesh.route.free_blocks": [c.free_blocks for c in cands],
            "kvmesh.route.cached_blocks": [c.cached_blocks for c in cands],
            "kvmesh.route.engine_reserved_blocks": [c.reserved_blocks for c in cands],
            "kvmesh.route.waiting_tokens": [c.waiting_tokens for c in cands],
            "kvmesh.route.pending_blocks": [c.pending_blocks for c in cands],
            "kvmesh.route.in_flight": [c.in_flight for c in cands],
            "kvmesh.route.report_age_s": [round(float(c.report_age_s), 4) for c in cands],
            "kvmesh.route.need_blocks": [s.need_blocks for s in self.scored],
            "kvmesh.route.scores": [float(s.score) for s in self.scored],
            "kvmesh.route.tiers": [s.tier for s in self.scored],
            "kvmesh.route.matched_blocks": [s.matched_blocks for s in self.scored],
            "kvmesh.route.prefix_sources": [s.prefix_source for s in self.scored],
        }


class Policy(Protocol):
    """Chooses one engine for a request. Must not mutate the candidates."""

    name: str

    def choose(self, request_id: str, candidates: Sequence[Candidate], num_prompt_tokens: int,
               max_tokens: int, rng: random.Random, prompt: "PromptKey | None" = None) -> Decision: ...


@dataclass(slots=True, frozen=True)
class PromptKey:
    """What the cache-aware policy needs of a prompt: its token ids and cache namespace."""

    token_ids: Sequence[int]
    cache_salt: str = ""


def _pick_best(scored: list[Scored], rng: random.Random) -> Scored:
    """The highest score; ties broken at random so that equal engines share a burst."""
    best = max(s.score for s in scored)
    return rng.choice([s for s in scored if s.score == best])


@dataclass
class KvAwarePolicy:
    """Most free KV blocks after the router's pending blocks and this request's need.

    score = available_blocks - need_blocks, where available_blocks = free + cached - the engine's
    reserved_blocks (growth held for its running requests) - its queued prompt blocks - the
    router's pending blocks.
    An engine "fits" with score >= 0. One with score >= -queue_ratio x total_blocks can still queue
    the request; below that it is full. Stale engines are used only when no fresh engine fits.

    Among engines that fit, the most free blocks win. Among engines that would queue, the score is
    the deficit in units of the engine's own capacity (score / total_blocks): a queue drains in
    proportion to the blocks that serve it, so an oversubscribed burst spreads in proportion to
    capacity instead of piling equal absolute deficits onto the small engines.
    """

    queue_ratio: float = 1.0
    name: str = "kv"

    def choose(self, request_id, candidates, num_prompt_tokens, max_tokens, rng, prompt=None):
        decision = Decision(request_id, self.name, num_prompt_tokens, max_tokens)
        for c in candidates:
            need = c.need_blocks(num_prompt_tokens, max_tokens)
            score = c.available_blocks() - need
            if need > c.total_blocks:
                tier = TIER_FULL  # could never run there, however empty
            elif score >= 0:
                tier = TIER_STALE_FITS if c.stale else TIER_FRESH_FITS
            elif score >= -self.queue_ratio * c.total_blocks:
                tier = TIER_STALE_QUEUES if c.stale else TIER_FRESH_QUEUES
                score = round(score / c.total_blocks, 6)
            else:
                tier = TIER_FULL
            decision.scored.append(Scored(c, need, score, tier))
        _choose_by_tier(decision, rng, bool(candidates))
        return decision


def _choose_by_tier(decision: Decision, rng: random.Random, any_candidates: bool) -> None:
    for tier in TIERS:
        group = [s for s in decision.scored if s.tier == tier]
        if group:
            pick = _pick_best(group, rng)
            decision.chosen = pick.candidate.address
            decision.reason = f"{tier}: highest score {pick.score}"
            return
    decision.reason = "no engine can admit the request" if any_candidates else "no ready engine"


@dataclass
class CacheAwarePolicy:
    """Expected prefix-cache hit, free blocks after the request, and queue balance, in one score.

    For each engine: m = leading blocks of the prompt it holds (PrefixIndex: its KV events, or the
    router's own decisions), new = need - m (matched blocks are shared, not taken), free_after =
    available_blocks - new. Tiers as in KvAwarePolicy (fits: free_after >= 0; stale engines only
    when no fresh one fits). Within the best tier:

        score = cache_weight x m / P  +  free_weight x free_after / total_blocks
                - (in_flight - the tier's least in_flight) / balance_requests

    with P the prompt's full blocks. A whole-prompt hit is worth cache_weight; each request an
    engine has in flight beyond the least busy one costs 1 / balance_requests. So an engine that
    holds the prefix keeps its traffic until it is about balance_requests x cache_weight requests
    busier than another, which then computes the prefix once and, holding it too, shares the hot
    traffic from then on (SGLang's cache-aware router makes the same trade with two thresholds;
    here it is one continuous score, so every decision is explained by its numbers). Free blocks
    break ties between equally cached, equally busy engines and keep new prefixes where room is.

    Every decision feeds the index's approximate part (the prompt's blocks on the chosen engine).
    """

    index: PrefixIndex
    queue_ratio: float = 1.0
    cache_weight: float = 1.0
    free_weight: float = 0.25
    balance_requests: float = 4.0
    name: str = "cache_aware"

    def choose(self, request_id, candidates, num_prompt_tokens, max_tokens, rng, prompt=None):
        decision = Decision(request_id, self.name, num_prompt_tokens, max_tokens)
        hashes_by_size: dict[int, list[int]] = {}
        for c in candidates:
            need = c.need_blocks(num_prompt_tokens, max_tokens)
            hashes = self._hashes(prompt, c.block_size, hashes_by_size)
            matched, source = self.index.match(c.address, hashes)
            free_after = c.available_blocks() - (need - matched)
            if need > c.total_blocks or free_after < -self.queue_ratio * c.total_blocks:
                tier = TIER_FULL
            elif free_after >= 0:
                tier = TIER_STALE_FITS if c.stale else TIER_FRESH_FITS
            else:
                tier = TIER_STALE_QUEUES if c.stale else TIER_FRESH_QUEUES
            hit = matched / len(hashes) if hashes else 0.0
            score = self.cache_weight * hit + self.free_weight * free_after / c.total_blocks
            decision.scored.append(Scored(c, need, score, tier, matched, source))
        for tier in TIERS:  # the busy term is relative to the least busy engine of the same tier
            group = [s for s in decision.scored if s.tier == tier]
            least = min((s.candidate.in_flight for s in group), default=0)
            for s in group:
                s.score = round(s.score - (s.candidate.in_flight - least) / self.balance_requests, 6)
        _choose_by_tier(decision, rng, bool(candidates))
        if decision.chosen is not None:
            chosen = decision.chosen_scored
            self.index.note_routed(decision.chosen, hashes_by_size.get(chosen.candidate.block_size, []))
        return decision

    @staticmethod
    def _hashes(prompt: PromptKey | None, block_size: int, memo: dict[int, list[int]]) -> list[int]:
        """The prompt's full-block hashes at this block size but the last token's block (the engine
        always computes that one), computed once per block size."""
        if prompt is None or not prompt.token_ids:
            return []
        if block_size not in memo:
            memo[block_size] = prompt_block_hashes(prompt.token_ids[:-1], block_size, prompt.cache_salt)
        return memo[block_size]


@dataclass
class RoundRobinPolicy:
    """Baseline: engines in turn, ignoring load (still never where the request cannot fit at all)."""

    name: str = "round_robin"
    _counter: itertools.count = field(default_factory=itertools.count)

    def choose(self, request_id, candidates, num_prompt_tokens, max_tokens, rng, prompt=None):
        decision = Decision(request_id, self.name, num_prompt_tokens, max_tokens)
        ordered = sorted(candidates, key=lambda c: c.address)
        turn = next(self._counter)
        for i, c in enumerate(ordered):
            need = c.need_blocks(num_prompt_tokens, max_tokens)
            fits = need <= c.total_blocks
            decision.scored.append(Scored(c, need, float((i - turn) % len(ordered)) if fits else -math.inf,
                                          TIER_FRESH_FITS if fits else TIER_FULL))
        _choose_lowest(decision, rng, "next in turn")
        return decision


@dataclass
class LeastRequestsPolicy:
    """Baseline: fewest requests this router has open on the engine, ties at random."""

    name: str = "least_requests"

    def choose(self, request_id, candidates, num_prompt_tokens, max_tokens, rng, prompt=None):
        decision = Decision(request_id, self.name, num_prompt_tokens, max_tokens)
        for c in candidates:
            need = c.need_blocks(num_prompt_tokens, max_tokens)
            fits = need <= c.total_blocks
            decision.scored.append(Scored(c, need, float(c.in_flight) if fits else -math.inf,
                                          TIER_FRESH_FITS if fits else TIER_FULL))
        _choose_lowest(decision, rng, "fewest in flight")
        return decision


def _choose_lowest(decision: Decision, rng: random.Random, rule: str) -> None:
    """For the baselines, where a lower score is better; -inf marks 'cannot fit'."""
    usable = [s for s in decision.scored if s.tier != TIER_FULL]
    if not usable:
        decision.reason = "no engine can admit the request" if decision.scored else "no ready engine"
        return
    best = min(s.score for s in usable)
    pick = rng.choice([s for s in usable if s.score == best])
    decision.chosen = pick.candidate.address
    decision.reason = f"{rule}: score {pick.score}"


POLICIES = {"kv": KvAwarePolicy, "cache_aware": CacheAwarePolicy, "round_robin": RoundRobinPolicy,
            "least_requests": LeastRequestsPolicy}


def make_policy(name: str, *, queue_ratio: float = 1.0, prefix_index: PrefixIndex | None = None,
                cache_weight: float = 1.0, balance_requests: float = 4.0) -> Policy:
    """Build a policy by its flag name (kv, cache_aware, round_robin, least_requests)."""
    if name == "kv":
        return KvAwarePolicy(queue_ratio=queue_ratio)
    if name == "cache_aware":
        return CacheAwarePolicy(prefix_index if prefix_index is not None else PrefixIndex(),
                                queue_ratio=queue_ratio, cache_weight=cache_weight,
                                balance_requests=balance_requests)
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name]()
