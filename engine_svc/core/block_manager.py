"""The KV block manager: fixed-size blocks, a free list, per-request block tables, reference counts.

Imports no torch: it hands out block *ids*; the model runner owns the tensors they index
(``k_cache[block_id]``, see engine_svc/attention/base.py).

Accounting: every block is in exactly one of three states, and after every operation

    num_free_blocks + num_cached_blocks + num_in_use_blocks == num_blocks

- free:   on the free list, holding nothing;
- cached: holding a reusable prefix but referenced by no request (evictable). Nothing produces
          cached blocks until prefix caching lands; the state exists so the accounting, the load
          report and the metric do not change shape when it does;
- in use: referenced by at least one request's block table (ref count > 0). Reference counts
          above one come from sharing (``share``), the hook for prefix sharing.

The scheduler never touches the free list: it asks ``allocate`` for the blocks a request needs to
hold ``num_tokens`` tokens and gets an Allocation or None ("does not fit"; nothing changed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvmesh.blocks import blocks_for


@dataclass(slots=True)
class Allocation:
    """The result of a successful allocate(). Read by the scheduler (and by tests)."""

    new_block_ids: list[int]  # blocks appended to the table by this call, in table order
    num_blocks: int  # length of the request's table after the call


class BlockManager:
    """Owns the block pool. Single-threaded: only the engine loop thread calls it.

    Order of the free list: allocation takes from the head, freeing appends to the tail, so a freed
    block is reused last (a future prefix cache keeps its content longest). A request's blocks are
    freed last-block first, so the shared-prefix end of a table is the last to be reused.
    """

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._cached: set[int] = set()  # evictable prefix blocks (none until prefix caching lands)
        self._num_in_use = 0
        self._tables: dict[str, list[int]] = {}

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
        return self.num_blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> Allocation | None:
        """Grow the request's table to hold num_tokens tokens.

        Returns:
            An Allocation (possibly with no new blocks), or None when the free list is too short;
            then nothing changed.
        """
        need = self.num_blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            return None
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() for _ in range(need)]
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

    def free(self, request_id: str) -> int:
        """Drop the request's table. Returns how many blocks went back to the free list."""
        table = self._tables.pop(request_id, None)
        if not table:
            return 0
        freed = 0
        for block_id in reversed(table):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)
                freed += 1
        self._num_in_use -= freed
        return freed

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
        assert not (free & in_use) and not (free & self._cached) and not (in_use & self._cached)
        assert len(in_use) == self._num_in_use
        assert len(free) + len(self._cached) + len(in_use) == self.num_blocks, (
            f"free {len(free)} + cached {len(self._cached)} + in use {len(in_use)} != {self.num_blocks}")
