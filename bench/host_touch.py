"""How fast this machine's host memory takes its first write, against a second write of memory it has had before.

    python -m bench.host_touch [--gib 96] [--chunk-gib 4] [--max-s 60] --out FILE.json

The service's first run on a freshly started GPU machine ingested less than a second run on the same machine, in
whichever order the pinning settings ran (sessions 57 and 58). Where host memory is backed by the machine's host only
when first written, every page the first run takes for the first time (pinned chunks, durable records in
``/dev/shm``) costs more than a page that an earlier process wrote and gave back. This script writes ``--gib`` of
host memory in chunks of ``--chunk-gib`` and keeps them (stopping after the chunk that passes ``--max-s``), gives
them all back, then writes as much again; per pass: each chunk's GB/s and their overall rate. Run first on a fresh
machine, it also leaves that much memory written once, for whatever runs next.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.host_touch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=96.0, help="host memory each pass writes, in GiB")
    parser.add_argument("--chunk-gib", type=float, default=4.0, help="size of one allocation, in GiB")
    parser.add_argument("--max-s", type=float, default=None, help="end the first pass after this many seconds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not 0 < args.chunk_gib <= args.gib:
        parser.error(f"--chunk-gib must be above 0 and at most --gib ({args.gib}), not {args.chunk_gib}")
    return args


def write_pass(total_bytes: int, chunk_bytes: int, max_s: float | None) -> dict:
    """Allocates and writes ``total_bytes`` in chunks, keeping them all until the pass ends (after ``max_s``
    seconds, when given, however much it has written)."""
    kept: list[torch.Tensor] = []
    chunk_rates: list[float] = []
    start = time.perf_counter()
    written = 0
    while written < total_bytes:
        size = min(chunk_bytes, total_bytes - written)
        chunk_start = time.perf_counter()
        kept.append(torch.empty(size, dtype=torch.uint8).fill_(1))
        chunk_rates.append(size / (time.perf_counter() - chunk_start) / 1e9)
        written += size
        if max_s is not None and time.perf_counter() - start > max_s:
            break
    seconds = time.perf_counter() - start
    return {"bytes": written, "seconds": seconds, "gb_per_s": written / seconds / 1e9, "chunk_gb_per_s": chunk_rates}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    total, chunk = int(args.gib * GIB), int(args.chunk_gib * GIB)
    passes = {}
    for name, max_s in (("first", args.max_s), ("second", None)):
        passes[name] = write_pass(total, chunk, max_s)
        total = passes[name]["bytes"]
        rates = passes[name]["chunk_gb_per_s"]
        print(
            f"{name} write of {total / GIB:g} GiB: {passes[name]['gb_per_s']:.2f} GB/s "
            f"(chunks {min(rates):.2f}-{max(rates):.2f} GB/s)",
            flush=True,
        )
    report = {"gib": args.gib, "chunk_gib": args.chunk_gib, "torch_threads": torch.get_num_threads(), **passes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
