"""Sweep of the paged slot attention's tiles and key splits over the shapes the engine's graphs run.

    python -m bench.slot_attention_sweep --out FILE.json          # GPU: qwen2.5-vl-7b's heads, the engine's pages
    python -m bench.slot_attention_sweep --quick --out FILE.json  # CPU, Triton interpreter: a smoke test only

The pool is the arena's: pages ``[P, layers, 2, kv heads, page tokens, head_dim]``, one layer's view, each row's
slots whole pages in random order, tables padded with -1 to a width rounded up to 2,048 as the decode and prefill
graphs round theirs. Cases: decode steps of 1 to 16 answers over about 16k keys each (a 16k-token budget), and
question prefills of 32 and 64 tokens over as many. Every (tiles, splits) point is timed by CUDA-graph replay
(``triton.testing.do_bench_cudagraph``, median), as the engine runs it; ``auto`` is today's plan
(``attention_plan.kernel_config`` and ``plan_splits``). Each point's output is checked against the auto plan's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton

from mosaic_core import kernels
from mosaic_core.kernels import attention_plan

WIDTH_STEP = 2048
TODAY = (0, 64, 4, 3)
TILES = [  # (block_m, block_n, num_warps, num_stages); block_m 0 follows the rows as in attention_plan.kernel_config
    TODAY,
    (0, 64, 4, 2),
    (0, 64, 4, 4),
    (0, 64, 8, 3),
    (0, 64, 2, 3),
    (0, 32, 4, 3),
    (0, 32, 2, 4),
    (0, 128, 4, 2),
    (0, 128, 8, 2),
    (0, 128, 8, 3),
]
TALL_TILES = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2)]  # prefill only
CASES = "b1q1,b2q1,b4q1,b8q1,b16q1,b1q32,b1q64"


def _case_tables(batch: int, keys: int, page: int, pool_pages: int, gen: torch.Generator):
    """Slot tables of ``batch`` rows, each about ``keys`` keys (whole pages in random order, lengths apart by
    up to a page), -1 padded to the width rounded up to WIDTH_STEP; and the rows' lengths."""
    lens = [keys - int(torch.randint(0, page, (1,), generator=gen)) for _ in range(batch)]
    width = -(-max(lens) // WIDTH_STEP) * WIDTH_STEP
    table = torch.full((batch, width), -1, dtype=torch.int32)
    order = torch.randperm(pool_pages, generator=gen)
    taken = 0
    for row, length in enumerate(lens):
        pages = order[taken : taken + -(-length // page)]
        taken += len(pages)
        table[row, :length] = (pages[:, None] * page + torch.arange(page)[None, :]).flatten()[:length].to(torch.int32)
    return table, torch.tensor(lens, dtype=torch.int32)


def _splits_to_try(programs_a_split: int, sms: int, max_keys: int, block_n: int) -> list[int | None]:
    """None (the auto plan) and split counts that make the grid about 0.5 to 4 times the SMs."""
    top = max(1, min(64, max_keys // (4 * block_n)))
    wanted = {max(1, min(top, round(f * sms / programs_a_split))) for f in (0.5, 1, 1.5, 2, 3, 4)}
    return [None, *sorted(wanted)]


def _time_ms(fn, cuda: bool) -> float:
    fn()
    if not cuda:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def _tiles_of(row: dict) -> tuple[int, int, int, int]:
    block_m = 0 if row["block_m"] <= 64 else row["block_m"]
    return block_m, row["block_n"], row["num_warps"], row["num_stages"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slot_attention_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes in the Triton interpreter (CPU)")
    parser.add_argument("--cases", default=CASES, help=f"b<answers>q<new tokens>, comma-separated (default {CASES})")
    parser.add_argument("--tall", action="store_true", help="also 128-row tiles for the cases of 32 or more tokens")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        parser.error("no CUDA device: run with --quick")
    dev = torch.device("cuda" if cuda else "cpu")
    hq, hkv, dim, layers, page, keys = (4, 2, 64, 2, 18, 300) if args.quick else (28, 4, 128, 28, 126, 16384)
    cases = [tuple(int(n) for n in case[1:].split("q")) for case in args.cases.split(",")]  # (batch, new tokens)
    if args.quick:
        cases = [(1, 1), (2, 1), (1, 8)]
    gen = torch.Generator().manual_seed(0)
    pool_pages = max(b for b, _ in cases) * -(-keys // page) + 8
    pool = torch.randn(pool_pages, layers, 2, hkv, page, dim, device=dev, dtype=torch.bfloat16)
    k_pages, v_pages = pool[:, layers // 2, 0], pool[:, layers // 2, 1]
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 4
    rows = []
    for batch, q_len in cases:
        table, lens = _case_tables(batch, keys, page, pool_pages, gen)
        table, lens = table.to(dev), lens.to(dev)
        q = torch.randn(batch, hq, q_len, dim, device=dev, dtype=torch.bfloat16)
        call = partial(kernels.paged_slot_attention, q, k_pages, v_pages, table, lens, scale=dim**-0.5)
        expected = call()
        read_bytes = int(lens.sum()) * 2 * hkv * dim * 2
        case = f"b{batch} q{q_len} keys~{keys} width {table.shape[1]}"
        tiles_to_try = TILES[:2] if args.quick else TILES + (TALL_TILES if args.tall and q_len >= 32 else [])
        for tall, block_n, warps, stages in tiles_to_try:
            block_m = tall or max(16, min(64, triton.next_power_of_2(q_len * hq // hkv)))
            tiles = attention_plan.AttentionTiles(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            a_split = -(-q_len * hq // hkv // block_m) * batch * hkv
            for splits in _splits_to_try(a_split, sms, table.shape[1], block_n):
                fn = partial(call, tiles=tiles, num_splits=splits)
                err = (fn().float() - expected.float()).abs().max().item()
                ms = _time_ms(fn, cuda)
                plan = attention_plan.plan_splits(
                    attention_plan.AttentionLaunch(
                        batch=batch, num_q_heads=hq, num_kv_heads=hkv, q_len=q_len, head_dim=dim,
                        max_kv_tokens=table.shape[1], causal_shift=0, page_tokens=page, slots=True,
                    ),
                    block_m, block_n, splits, dev,
                )  # fmt: skip
                rows.append(
                    {
                        "case": case, "batch": batch, "q_len": q_len, "block_m": block_m, "block_n": block_n,
                        "num_warps": warps, "num_stages": stages, "splits_asked": splits, "splits": plan[0],
                        "programs": plan[0] * a_split, "ms": ms, "gb_per_s": read_bytes / ms / 1e6,
                        "max_err": err,
                    }
                )  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU, Triton interpreter (timings meaningless)'}")
    print("case | today's tiles (64x64, 4 warps, 3 stages), auto splits | best | best's tiles and splits | speed-up")
    print("--- | --- | --- | --- | ---")
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        today = next(r for r in mine if _tiles_of(r) == TODAY and r["splits_asked"] is None)
        best = min(mine, key=lambda r: r["ms"])
        print(
            f"{case} | {today['ms'] * 1e3:.1f} µs, {today['gb_per_s']:.0f} GB/s, {today['programs']} programs | "
            f"{best['ms'] * 1e3:.1f} µs, {best['gb_per_s']:.0f} GB/s | m{best['block_m']} n{best['block_n']} "
            f"w{best['num_warps']} s{best['num_stages']}, {best['splits']} splits, {best['programs']} programs | "
            f"{today['ms'] / best['ms']:.2f}x"
        )
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name() if cuda else None, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
