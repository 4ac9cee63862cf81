"""Automatic prefix caching: which KV blocks hold which prefixes, which of them may be evicted, and
the stored/removed events routers follow. Imports no torch; owned by the BlockManager.

A block gets a hash (kvmesh/prefix_hash.py: chained over its parent's hash and its token ids, so
the hash names the whole prefix up to the block's end) once all its tokens are computed. From then
on the block is findable: a new request whose prompt starts with the same tokens takes it into its
own block table instead of computing it again. When no request references a hashed block any more
it is *cached* (evictable): it keeps its hash and content until an allocation finds the free list
empty and evicts the least recently used cached block.

Why an ordered dict for the evictable set: its order IS the eviction order. A request's blocks are
released last block first, so a sequence's tail goes before its head, and a prefix shared by many
requests (released later, by its last user) outlives the suffixes that hang off it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmesh.prefix_hash import root_hash


@dataclass(slots=True, frozen=True)
class BlocksStored:
    """Blocks that became findable, in chain order: block_hashes[0]'s parent is parent_hash."""

    block_hashes: tuple[int, ...]
    parent_hash: int  # the first block's parent: root_hash(salt) for a sequence's first block
    time: float  # engine monotonic clock


@dataclass(slots=True, frozen=True)
class BlocksRemoved:
    """Blocks evicted: their hashes no longer name anything on this engine."""

    block_hashes: tuple[int, ...]
    time: float


KvEvent = BlocksStored | BlocksRemoved


@dataclass(slots=True)
class PrefixHit:
    """The result of PrefixCache.lookup: the longest cached prefix of a request."""

    block_ids: list[int]  # in table order
    num_evictable: int  # how many of them are cached (ref count 0): taking them shrinks the evictable pool


class PrefixCache:
    """Hash -> block map, the block's token ids (to rule out hash collisions) and the LRU of evictable
    blocks. The BlockManager decides when blocks move; this class only keeps the books.

    Events: when `events` is a deque (see enable_events) every store and eviction is appended to it,
    from the engine thread; a reader on another thread pops from the left (deque appends and pops
    are atomic), so the engine never waits for a router.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._block_of: dict[int, int] = {}  # hash -> block id
        self._hash_of: dict[int, int] = {}  # block id -> hash (hashed blocks only)
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block id -> its token ids
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, LRU first
        self.events: deque[KvEvent] | None = None

    def enable_events(self) -> deque[KvEvent]:
        """Start recording KV events; returns the deque they are appended to."""
        if self.events is None:
            self.events = deque()
        return self.events

    def __len__(self) -> int:
        return len(self._block_of)

    def hashes(self) -> list[int]:
        """Every hash that names a block now (a snapshot for a late subscriber)."""
        return list(self._block_of)

    def is_hashed(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def lookup(self, hashes: Sequence[int], token_ids: Callable[[int, int], list[int]],
               max_blocks: int, ref_counts: list[int]) -> PrefixHit:
        """The longest run of hashes[0:max_blocks] held here whose token ids match too."""
        hit = PrefixHit([], 0)
        bs = self.block_size
        for i in range(min(max_blocks, len(hashes))):
            block_id = self._block_of.get(hashes[i])
            if block_id is None or self._tokens_of[block_id] != tuple(token_ids(i * bs, (i + 1) * bs)):
                break
            hit.block_ids.append(block_id)
            hit.num_evictable += ref_counts[block_id] == 0
        return hit

    def store(self, block_ids: Sequence[int], num_blocks: int, hashes: Sequence[int], first: int,
              token_ids: Callable[[int, int], list[int]], cache_salt: str) -> None:
        """Make table blocks [first, num_blocks) findable under hashes[first:num_blocks].

        A hash already naming another block (the same prefix computed twice, by requests admitted
        together) keeps its block; this copy stays unhashed and goes to the free list when released.
        """
        bs = self.block_size
        stored: list[int] = []
        parent = hashes[first - 1] if first > 0 else root_hash(cache_salt)
        for i in range(first, num_blocks):
            h, block_id = hashes[i], block_ids[i]
            if h in self._block_of or block_id in self._hash_of:
                if not stored:
                    parent = h
                continue
            self._block_of[h] = block_id
            self._hash_of[block_id] = h
            self._tokens_of[block_id] = tuple(token_ids(i * bs, (i + 1) * bs))
            stored.append(h)
        if stored and self.events is not None:
            self.events.append(BlocksStored(tuple(stored), parent, time.monotonic()))

    def evict_lru(self) -> int:
        """Forget the least recently used cached block; returns its id (now holding nothing)."""
        block_id, _ = self.evictable.popitem(last=False)
        h = self._hash_of.pop(block_id)
        del self._block_of[h], self._tokens_of[block_id]
        if self.events is not None:
            self.events.append(BlocksRemoved((h,), time.monotonic()))
        return block_id
