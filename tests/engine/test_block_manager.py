"""BlockManager: exact block ids, free-list order, reference counts, the accounting invariant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_svc.core.block_manager import BlockManager


def counts(bm: BlockManager) -> tuple[int, int, int]:
    return bm.num_free_blocks, bm.num_cached_blocks, bm.num_in_use_blocks


def test_allocate_grows_tables_with_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate("a", 5)  # 5 tokens -> 2 blocks
    assert a.new_block_ids == [0, 1] and a.num_blocks == 2
    assert bm.allocate("b", 4).new_block_ids == [2]
    assert bm.allocate("a", 8).new_block_ids == []  # still fits in 2 blocks
    assert bm.allocate("a", 9).new_block_ids == [3]
    assert bm.block_table("a") == [0, 1, 3] and bm.block_table("b") == [2]
    assert counts(bm) == (4, 0, 4)
    bm.check()


def test_free_returns_blocks_last_block_first_to_the_tail():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate("a", 12)  # [0, 1, 2]
    bm.allocate("b", 4)  # [3]
    assert bm.free("a") == 3
    assert counts(bm) == (5, 0, 1)
    # The free list is now [4, 5, 2, 1, 0]: untouched blocks first, then a's blocks tail-first.
    assert bm.allocate("c", 20).new_block_ids == [4, 5, 2, 1, 0]
    assert bm.free("missing") == 0
    bm.check()


def test_allocate_none_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate("a", 33)  # 3 blocks
    before = (counts(bm), list(bm.block_table("a")))
    assert bm.allocate("b", 17) is None  # needs 2, 1 free
    assert bm.allocate("a", 65) is None  # needs 2 more
    assert (counts(bm), list(bm.block_table("a"))) == before
    assert bm.block_table("b") == []
    assert bm.can_allocate("b", 16) and not bm.can_allocate("b", 17)
    bm.check()


def test_shared_blocks_are_freed_by_the_last_reference():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)  # [0, 1]
    bm.share("b", [0, 1])
    bm.allocate("b", 12)  # b = [0, 1, 2]
    assert counts(bm) == (1, 0, 3)
    assert bm.free("a") == 0  # still referenced by b
    assert counts(bm) == (1, 0, 3)
    bm.check()
    assert bm.free("b") == 3
    assert counts(bm) == (4, 0, 0)
    bm.check()
    with pytest.raises(AssertionError):
        bm.share("c", [0])  # a free block cannot be shared


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 40), st.booleans()), max_size=60))
def test_invariant_after_every_operation(ops):
    bm = BlockManager(num_blocks=10, block_size=4)
    for rid, num_tokens, do_free in ops:
        before = counts(bm)
        if do_free:
            bm.free(rid)
        else:
            need = bm.num_blocks_needed(rid, num_tokens)
            result = bm.allocate(rid, num_tokens)
            assert (result is None) == (need > before[0])
            if result is None:
                assert counts(bm) == before
            else:
                assert len(result.new_block_ids) == need
        bm.check()
        assert sum(counts(bm)) == bm.num_blocks
