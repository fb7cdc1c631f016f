"""Page bookkeeping: free + used = total after any sequence, double frees raise, records split without copies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.bookkeeping.pages import ClusterPages, PageAllocator, pages_for
from mosaic_core.errors import StateError


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_free_plus_used_is_total_and_no_page_is_handed_out_twice(ops):
    allocator = PageAllocator(12)
    held: list[list[int]] = []
    for take, n in ops:
        if take:
            can = allocator.can_allocate(n)
            pages = allocator.allocate(n)
            assert (pages is not None) == can
            if pages is not None:
                held.append(pages)
        elif held:
            allocator.free(held.pop(n % len(held)))
        in_use = [p for pages in held for p in pages]
        assert len(in_use) == len(set(in_use)) == allocator.num_used
        assert allocator.num_free + allocator.num_used == allocator.num_pages


def test_a_shortfall_takes_nothing_and_a_double_free_raises():
    allocator = PageAllocator(3)
    pages = allocator.allocate(2)
    assert allocator.allocate(2) is None and allocator.num_free == 1
    allocator.free(pages)
    with pytest.raises(StateError, match="double free"):
        allocator.free(pages[:1])
    with pytest.raises(StateError):
        allocator.free([7])


def test_grown_pages_come_after_the_old_ones():
    allocator = PageAllocator(2)
    assert list(allocator.grow(3)) == [2, 3, 4]
    assert sorted(allocator.allocate(5)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("tokens", "page", "fills"), [(16, 16, [16]), (17, 8, [8, 8, 1]), (3, 8, [3]), (0, 4, [])])
def test_pages_for(tokens, page, fills):
    assert pages_for(tokens, page) == fills


def test_a_record_splits_into_two_page_lists_in_place():
    record = ClusterPages("cam/c000001", [4, 4, 2], device=[9, 3, 5], host=None)
    left, right = record.split(2, "cam/c000002")
    assert (left.fills, left.device, left.host) == ([4, 4], [9, 3], None)
    assert (right.cluster_id, right.fills, right.device) == ("cam/c000002", [2], [5])
    assert left.num_tokens + right.num_tokens == record.num_tokens
