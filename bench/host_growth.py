"""How long the engine thread waits for the host pool to grow, with the next chunk pinned ahead and without.

    python -m bench.host_growth [--gib 4] [--window-pages 8] [--every-ms 50] [--start-ms 1000] [--pin-by register]
        [--device cuda] --out FILE.json

At 256 cameras on an H100 the device tier was full and windows left it for the host at about 1.1 GB/s, so the host
pool pinned a new 256-MiB chunk about every 0.23 s, on the engine thread, inside ``keep_host_copy``: 100 ms and more
at a time. This script builds the arena's pools with the 7B model's pages (28 layers, 4 KV heads, head_dim 128,
bf16, 126-token pages, 6.9 MiB), and like that engine thread takes a window of ``--window-pages`` host pages every
``--every-ms``, queues their copy from device pages on the side stream, queues a matrix product on the compute
stream and sleeps the rest of the period, until ``--gib`` of host pool is taken, starting ``--start-ms`` after the
pools are made (an engine's start and its first minutes come before its first host page; with growth ahead the pools
pin their first chunk meanwhile); once with the next chunk pinned on
the engine thread (``grow_host_ahead`` off) and once ahead on the pool's own thread (on), in one process. Both pools
are kept until the end, so the second run pins fresh memory rather than the caching host allocator's freed blocks.

Per run: each take's time (p50, p99, max, how many over 10 ms, their sum), each step's engine-thread work (take,
queuing the copy and the product: pinning on another thread may hold the driver, and so the engine thread's calls,
elsewhere than in ``take``), and the chunks pinned ahead and on the engine thread. ``--pin-by`` says how torch pins:
as the engine has it pin (``register``) or with torch's default (``alloc``), which holds the driver far longer.
``--device cpu`` runs the same steps with unpinned chunks and no product, to check the script off a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory import arena
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.host_growth import fault_pages_before_pinning
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC_7B = KVSpec(num_layers=28, num_kv_heads=4, num_q_heads=28, head_dim=128, dtype=torch.bfloat16)
PAGE_TOKENS = 126
SLOW_S = 0.010  # a take longer than this holds a question's start noticeably


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.host_growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="host pool each run takes, in GiB (its capacity)")
    parser.add_argument("--window-pages", type=int, default=8, help="host pages one take asks for")
    parser.add_argument("--every-ms", type=float, default=50.0, help="period of the takes")
    parser.add_argument(
        "--start-ms", type=float, default=1000.0, help="wait between making the pools and the first take"
    )
    parser.add_argument("--matmul", type=int, default=2048, help="side of the bf16 product queued each step (0: none)")
    parser.add_argument("--chunk-mib", type=int, default=arena.HOST_CHUNK_BYTES >> 20, help="host chunk size")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--pin-by",
        default="register",
        choices=("register", "alloc"),
        help="register: fault pages in, then cudaHostRegister, as the engine has torch pin "
        "(fault_pages_before_pinning); alloc: torch's default, cudaHostAlloc",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("gib", "window_pages", "every_ms", "chunk_mib"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.start_ms < 0:
        parser.error(f"--start-ms must not be negative, got {args.start_ms}")
    return args


def _run(args: argparse.Namespace, device: torch.device, *, ahead: bool) -> tuple[dict, PagePools]:
    page_bytes = SPEC_7B.bytes_per_token * PAGE_TOKENS
    pools = PagePools(
        SPEC_7B, page_tokens=PAGE_TOKENS, device=device, device_bytes=args.window_pages * page_bytes,
        host_bytes=int(args.gib * 2**30), transfers=TransferEngine(device), grow_host_ahead=ahead,
    )  # fmt: skip
    window = pools.take(Tier.DEVICE, args.window_pages)
    time.sleep(args.start_ms / 1e3)
    gpu_work = device.type == "cuda" and args.matmul > 0
    product = torch.randn(args.matmul, args.matmul, device=device, dtype=torch.bfloat16) if gpu_work else None
    takes, steps = [], []
    started = time.perf_counter()
    while True:
        step = time.perf_counter()
        pages = pools.take(Tier.HOST, args.window_pages)
        took = time.perf_counter() - step
        if pages is None:
            break
        takes.append(took)
        pools.transfers.wait(pools.copy(Tier.DEVICE, window, Tier.HOST, pages))
        if product is not None:
            torch.mm(product, product)
        steps.append(time.perf_counter() - step)
        time.sleep(max(0.0, args.every_ms / 1e3 - steps[-1]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_s = time.perf_counter() - started
    pools.close()
    growth = pools.host_growth
    return {
        "ahead": ahead,
        "takes": len(takes),
        "pinned_gib": pools.host_pages.num_pages * page_bytes / 2**30,
        "take_ms": _quantiles(takes),
        "takes_over_10ms": sum(t > SLOW_S for t in takes),
        "take_total_s": sum(takes),
        "step_ms": _quantiles(steps),
        "steps_over_10ms": sum(t > SLOW_S for t in steps),
        "chunks_sync": growth.sync_chunks,
        "chunks_ahead": growth.ahead_chunks,
        "grow_wait_s": growth.wait_s,
        "wall_s": wall_s,
    }, pools


def _quantiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds or [0.0]) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


# The table's lines: a label, the row's field (and its quantile, for the timings) and the cell's format.
_LINES = (
    ("takes", "takes", None, "d"),
    ("take p50 ms", "take_ms", "p50", ".3f"),
    ("take p99 ms", "take_ms", "p99", ".2f"),
    ("take max ms", "take_ms", "max", ".2f"),
    ("takes over 10 ms", "takes_over_10ms", None, "d"),
    ("time in take s", "take_total_s", None, ".3f"),
    ("step p99 ms", "step_ms", "p99", ".2f"),
    ("step max ms", "step_ms", "max", ".2f"),
    ("steps over 10 ms", "steps_over_10ms", None, "d"),
    ("grow wait s", "grow_wait_s", None, ".3f"),
    ("pinned GiB", "pinned_gib", None, ".2f"),
)


def _table(rows: list[dict]) -> str:
    lines = [f"{'':24}" + "".join(f"{'ahead ' + ('on' if row['ahead'] else 'off'):>14}" for row in rows)]
    for label, field, quantile, spec in _LINES:
        cells = [row[field] if quantile is None else row[field][quantile] for row in rows]
        lines.append(f"{label:24}" + "".join(f"{format(cell, spec):>14}" for cell in cells))
    chunks = [f"{row['chunks_sync']}/{row['chunks_ahead']}" for row in rows]
    lines.append(f"{'chunks sync/ahead':24}" + "".join(f"{cell:>14}" for cell in chunks))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is needed (--device cpu runs the same steps with unpinned chunks)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and args.pin_by == "register":
        fault_pages_before_pinning()
    arena.HOST_CHUNK_BYTES = args.chunk_mib << 20  # read as each pool is made
    rows, kept = [], []
    for ahead in (False, True):
        row, pools = _run(args, device, ahead=ahead)
        kept.append(pools)  # its chunks stay pinned: the next run must pin its own
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(_table(rows))
    report = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "page_bytes": SPEC_7B.bytes_per_token * PAGE_TOKENS,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
