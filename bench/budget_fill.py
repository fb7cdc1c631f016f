"""A question's budget fill, reading every candidate against stopping once nothing else fits, on the host.

    python -m bench.budget_fill [--candidates 1428] [--budget 16384] --out FILE.json

Candidates of one to four frames (126 tokens each, scenario A's page), in a random order as the scores rank them;
both fills, as ``Retriever.fill_budget`` made them before and makes them now, are checked to take the same
candidates, then each is timed (the median of 5 rounds of 2,000 fills).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import timeit
from pathlib import Path

from mosaic_core.engine.selection import fill_in_order


def every_candidate_read(order: list[int], candidates: list[str], sizes: dict[str, int], budget: int) -> list[str]:
    """The fill as ``Retriever.fill_budget`` was before ``fill_in_order``: every candidate is looked at, its size
    found by its id."""
    chosen, used = [], 0
    for i in order:
        cluster_id = candidates[i]
        size = sizes[cluster_id]
        if used + size <= budget:
            chosen.append(cluster_id)
            used += size
    return chosen


def stopping_when_full(order: list[int], candidates: list[str], sizes: list[int], budget: int, smallest: int):
    """The fill as ``Retriever.fill_budget`` makes it now."""
    return [candidates[i] for i in fill_in_order(order, sizes, budget, smallest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget_fill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=1428)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    sizes = [126 * rng.randint(1, 4) for _ in range(args.candidates)]
    order = list(range(args.candidates))
    rng.shuffle(order)
    smallest = min(sizes)
    candidates = [f"cam/c{i:06d}" for i in range(args.candidates)]
    by_id = dict(zip(candidates, sizes, strict=True))
    before = every_candidate_read(order, candidates, by_id, args.budget)
    assert stopping_when_full(order, candidates, sizes, args.budget, smallest) == before

    def median_us(fill) -> float:
        return statistics.median(timeit.repeat(fill, number=2000, repeat=5)) / 2000 * 1e6

    report = {
        "candidates": args.candidates,
        "budget_tokens": args.budget,
        "chosen": len(before),
        "every_candidate_read_us": median_us(lambda: every_candidate_read(order, candidates, by_id, args.budget)),
        "stopping_when_full_us": median_us(lambda: stopping_when_full(order, candidates, sizes, args.budget, smallest)),
    }
    print(json.dumps(report))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
