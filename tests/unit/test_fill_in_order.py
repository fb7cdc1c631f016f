"""A question's greedy fill of its token budget stops early only where nothing else could fit; its staging
groups cover every layer once."""

from __future__ import annotations

import random

from mosaic_core.engine.selection import fill_in_order


def _every_index_looked_at(order: list[int], sizes: list[int], budget: int) -> list[int]:
    taken, used = [], 0
    for i in order:
        if used + sizes[i] <= budget:
            taken.append(i)
            used += sizes[i]
    return taken


def test_the_early_stop_takes_what_looking_at_every_index_takes():
    rng = random.Random(7)
    for _ in range(500):
        sizes = [rng.choice((126, 252, 378, 2016, rng.randint(1, 3000))) for _ in range(rng.randint(1, 300))]
        order = list(range(len(sizes)))
        rng.shuffle(order)
        budget = rng.randint(0, 20000)
        assert fill_in_order(order, sizes, budget, min(sizes)) == _every_index_looked_at(order, sizes, budget)


def test_a_full_budget_stops_the_fill_before_the_rest_is_read():
    sizes = [100, 100, 50] + [100] * 1000
    looked_at = []

    class Order(list):
        def __iter__(self):
            for i in super().__iter__():
                looked_at.append(i)
                yield i

    assert fill_in_order(Order(range(len(sizes))), sizes, 250, 50) == [0, 1, 2]
    assert looked_at == [0, 1, 2], "with 250 of 250 tokens taken nothing more is read"


def test_layer_groups_cut_the_layers_after_the_anchor_by_the_sizes_given_the_last_repeating():
    from mosaic_core.engine.machinery import layer_groups

    assert layer_groups(range(2, 28), (8, 8, 6, 4)) == [range(2, 10), range(10, 18), range(18, 24), range(24, 28)]
    assert layer_groups(range(2, 28), (4,)) == [range(s, min(s + 4, 28)) for s in range(2, 28, 4)]
    assert layer_groups(range(2, 28), (20, 3)) == [range(2, 22), range(22, 25), range(25, 28)]
    assert layer_groups(range(1, 2), (8, 4)) == [range(1, 2)]
    assert layer_groups(range(3, 3), (4,)) == []
