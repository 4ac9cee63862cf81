"""The KV block manager: fixed-size blocks, a free list, per-request block tables, reference counts.

Imports no torch: it hands out block *ids*; the model runner owns the tensors they index
(``k_cache[block_id]``, see engine_svc/attention/base.py).

Accounting: every block is in exactly one of three states, and after every operation

    num_free_blocks + num_cached_blocks + num_in_use_blocks == num_blocks

- free:   on the free list, holding nothing;
- cached: holding a reusable prefix (its hash kept) but referenced by no request: evictable, least
          recently used first, when the free list runs dry (engine_svc/core/prefix_cache.py);
- in use: referenced by at least one request's block table (ref count > 0). Reference counts
          above one come from prefix sharing: several requests' tables start with the same blocks.

The scheduler never touches the free list: it asks ``lookup`` for a request's longest cached prefix,
``take_prefix`` to put it at the head of the request's table, ``allocate`` for the blocks the request
needs to hold ``num_tokens`` tokens (an Allocation, or None: "does not fit", nothing changed), and
``cache_blocks`` to make the blocks it has computed findable. Only FULL blocks are ever shared, and
a shared block is read-only for every request but the one that computed it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine_svc.core.prefix_cache import PrefixCache, PrefixHit
from kvmesh.blocks import blocks_for


@dataclass(slots=True)
class Allocation:
    """The result of a successful allocate(). Read by the scheduler (and by tests)."""

    new_block_ids: list[int]  # blocks appended to the table by this call, in table order
    num_blocks: int  # length of the request's table after the call


class BlockManager:
    """Owns the block pool. Single-threaded: only the engine loop thread calls it.

    Allocation takes from the head of the free list (blocks holding nothing) and, when it is empty,
    evicts the least recently used cached block. A request's blocks are released last block first,
    so the shared-prefix end of a table is the last to be reused.

    Args:
        enable_prefix_caching: keep computed full blocks findable by hash (off: every released
            block goes straight back to the free list, and lookup never hits).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._prefix = PrefixCache(block_size)
        self._cached = self._prefix.evictable  # cached (evictable) blocks, LRU first
        self._num_in_use = 0
        self._tables: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}  # request -> leading table blocks already findable

    # ---- counts ----

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_in_use_blocks(self) -> int:
        return self._num_in_use

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can get: free ones, then cached ones by eviction."""
        return len(self._free) + len(self._cached)

    @property
    def num_hashed_blocks(self) -> int:
        """Blocks findable by hash (cached ones and those in use)."""
        return len(self._prefix)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return blocks_for(num_tokens, self.block_size)

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks the request still lacks to hold num_tokens tokens (0 if it has enough)."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table (the live list: read it, do not keep or mutate it)."""
        return self._tables.get(request_id, [])

    # ---- operations ----

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_blocks_needed(request_id, num_tokens) <= self.num_available_blocks

    def allocate(self, request_id: str, num_tokens: int) -> Allocation | None:
        """Grow the request's table to hold num_tokens tokens.

        Returns:
            An Allocation (possibly with no new blocks), or None when free and cached blocks together
            are too few; then nothing changed.
        """
        need = self.num_blocks_needed(request_id, num_tokens)
        if need > self.num_available_blocks:
            return None
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() if self._free else self._prefix.evict_lru() for _ in range(need)]
        for block_id in new:
            assert self._ref_counts[block_id] == 0, f"block {block_id} on the free list is referenced"
            self._ref_counts[block_id] = 1
        self._num_in_use += need
        table.extend(new)
        return Allocation(new_block_ids=new, num_blocks=len(table))

    def share(self, request_id: str, block_ids: list[int]) -> None:
        """Append blocks already in use (a shared prefix) to the request's table: ref count + 1."""
        table = self._tables.setdefault(request_id, [])
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} is not in use and cannot be shared"
            self._ref_counts[block_id] += 1
            table.append(block_id)

    # ---- prefix caching ----

    def lookup(self, block_hashes: Sequence[int], token_ids: Callable[[int, int], list[int]],
               num_tokens: int) -> PrefixHit:
        """The longest cached prefix of a sequence of num_tokens tokens whose full blocks hash to
        block_hashes; token_ids(start, stop) reads its tokens. Capped below num_tokens, so at least
        the last token is computed (there must be logits to sample)."""
        if not self.enable_prefix_caching:
            return PrefixHit([], 0)
        return self._prefix.lookup(block_hashes, token_ids, (num_tokens - 1) // self.block_size,
                                   self._ref_counts)

    def take_prefix(self, request_id: str, hit: PrefixHit) -> None:
        """Start the (empty) table of a request with the blocks of its prefix hit: ref count + 1;
        cached ones are in use again (no longer evictable)."""
        assert not self._tables.get(request_id), f"request {request_id} already holds blocks"
        for block_id in hit.block_ids:
            if self._ref_counts[block_id] == 0:
                del self._cached[block_id]
                self._num_in_use += 1
            self._ref_counts[block_id] += 1
        self._tables[request_id] = list(hit.block_ids)
        self._num_hashed[request_id] = len(hit.block_ids)

    def num_hashed(self, request_id: str) -> int:
        """Leading blocks of the request's table that are already findable."""
        return self._num_hashed.get(request_id, 0)

    def cache_blocks(self, request_id: str, block_hashes: Sequence[int], num_full_blocks: int,
                     token_ids: Callable[[int, int], list[int]], cache_salt: str = "") -> None:
        """Make the request's first num_full_blocks table blocks (all their tokens computed)
        findable under block_hashes (at least that many)."""
        first = self._num_hashed.get(request_id, 0)
        if not self.enable_prefix_caching or num_full_blocks <= first:
            return
        table = self._tables[request_id]
        assert num_full_blocks <= len(table) and num_full_blocks <= len(block_hashes)
        self._prefix.store(table, num_full_blocks, block_hashes, first, token_ids, cache_salt)
        self._num_hashed[request_id] = num_full_blocks

    def enable_events(self):
        """Record stored/removed KV events from now on; returns the deque they are appended to."""
        return self._prefix.enable_events()

    def cached_hashes(self) -> list[int]:
        """Every block hash findable now (the snapshot a late KV-event subscriber starts from)."""
        return self._prefix.hashes()

    # ---- release ----

    def free(self, request_id: str) -> int:
        """Drop the request's table. Returns how many blocks left the in-use state.

        A block no request references any more becomes cached (evictable) if it is findable by
        hash, free otherwise. Last block first: a sequence's tail is evicted before its head.
        """
        self._num_hashed.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if not table:
            return 0
        released = 0
        for block_id in reversed(table):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self._ref_counts[block_id] == 0:
                if self._prefix.is_hashed(block_id):
                    self._cached[block_id] = None
                else:
                    self._free.append(block_id)
                released += 1
        self._num_in_use -= released
        return released

    def check(self) -> None:
        """Assert the accounting invariant from scratch (tests; O(num_blocks))."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        in_use = {b for b, n in enumerate(self._ref_counts) if n > 0}
        refs = [0] * self.num_blocks
        for table in self._tables.values():
            for block_id in table:
                refs[block_id] += 1
        assert refs == self._ref_counts, "reference counts disagree with the block tables"
        cached = set(self._cached)
        assert not (free & in_use) and not (free & cached) and not (in_use & cached)
        assert all(self._prefix.is_hashed(b) for b in cached), "an evictable block has no hash"
        assert not any(self._prefix.is_hashed(b) for b in free), "a free block still has a hash"
        assert len(in_use) == self._num_in_use
        assert len(free) + len(self._cached) + len(in_use) == self.num_blocks, (
            f"free {len(free)} + cached {len(self._cached)} + in use {len(in_use)} != {self.num_blocks}")
