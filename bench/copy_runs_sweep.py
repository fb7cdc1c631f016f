"""How fast the copy engines stage a question's retrieved pages, by run size and by how many side streams share them.

    python -m bench.copy_runs_sweep [--pages 97] [--repeats 20] [--consecutive 4,16] [--batch] [--with-compute]
        --out FILE.json
    (CUDA only)

A question at 60 minutes of history (scenario A, the 7B shape) stages about 97 host pages into device pages for 26
layers: one ``cudaMemcpyAsync`` per page and group of layers (``EngineConfig.prefill_graph_layers``, 4), about 680
runs of 1 MB each (``mosaic_core.memory.cudart``). On the H200 one such run took 21.6 us in a profiled question,
48 GB/s, where one 256-MiB copy reaches 55. This script times the same copies outside the engine, from the arena's
own pools (pages in random order, as a question finds them): for each group size (layers a run holds) and each
number of side streams (runs dealt round-robin to them, all waited for at the end), the median over ``--repeats``
of the whole staging's time and its GB/s, next to one contiguous copy of the same bytes.

Two questions about the in-engine rate, which is below this one (session 31's trace of a 60-minute question on
the H200: 560 runs of about 1 MB in 12.85 ms, 41.8 GB/s, while its layers computed):

- ``--with-compute``: every row again while another stream runs bf16 matrix products, as a question's layers run
  while its pages move. A gap between the two says the copies slow down beside compute.
- ``--consecutive K``: the pages come in runs of K consecutive pages on both sides, and each group of layers of a
  run is one strided copy (``cudart.copy_strided``, ``cudaMemcpy2DAsync``) in place of K copies; a row of one copy
  per page over the same pages is next to it. Today's pools give no such runs (pages come off a free list), so
  this says what laying a cluster's pages out consecutively would buy before anyone builds it.
- ``--batch``: every row of random pages again with each stream's runs of a group handed over in one
  ``cudaMemcpyBatchAsync`` call (CUDA 12.8 and later, ``cudart.copy_batch``), in place of one call a run; and once
  more with the batch's hint to favour overlap with compute. Whether the driver moves a batch faster than the same
  runs one call each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.machinery import layer_groups
from mosaic_core.memory import cudart
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC_7B = KVSpec(num_layers=28, num_kv_heads=4, num_q_heads=28, head_dim=128, dtype=torch.bfloat16)
PAGE_TOKENS = 126


class Compute:
    """bf16 matrix products queued on a stream of their own before each timed staging, long enough to outlast it."""

    def __init__(self, device: torch.device, *, size: int = 8192, count: int = 24) -> None:
        self.stream = torch.cuda.Stream(device)
        self.a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        self.out = torch.empty_like(self.a)
        self.count = count

    def queue(self) -> None:
        with torch.cuda.stream(self.stream):
            for _ in range(self.count):
                torch.mm(self.a, self.a, out=self.out)

    def wait(self) -> None:
        self.stream.synchronize()


def _strided_rows(pools: PagePools, src_starts: list[int], dst_starts: list[int], run: int, layers: range):
    """``copy_strided``'s rows for ``layers`` of runs of ``run`` consecutive pages from each of ``src_starts`` to
    the same layers of ``run`` consecutive device pages from each of ``dst_starts``."""
    rows = np.empty((len(src_starts), 5), dtype=np.int64)
    rows[:, 0] = pools.slab_addresses(Tier.HOST, src_starts, layers.start)
    rows[:, 1] = pools.slab_addresses(Tier.DEVICE, dst_starts, layers.start)
    rows[:, 2] = len(layers) * (pools.page_bytes // pools.spec.num_layers)
    rows[:, 3] = run
    rows[:, 4] = pools.page_bytes
    return rows


BATCHES = {"batch": cudart.copy_batch, "batch, overlap hint": partial(cudart.copy_batch, prefer_overlap=True)}


def _staging_seconds(
    pools, src, dst, sizes, streams, layers, *, run: int = 1, batch: str = "", compute: Compute | None = None
):
    """One staging of ``layers`` of ``src`` into ``dst``: runs of ``sizes`` layers (``layer_groups``) dealt to
    ``streams``; with ``run`` above 1, one strided copy per group of ``run`` consecutive pages (``src`` and ``dst``
    hold them in runs of that many); with ``batch`` (a key of ``BATCHES``), one batched call per group and stream."""
    groups = layer_groups(layers, sizes)
    if run > 1:
        runs = [_strided_rows(pools, src[::run], dst[::run], run, g) for g in groups]
        copy = cudart.copy_strided
    else:
        runs = [pools.block_rows(Tier.HOST, src, dst, g) for g in groups]
        copy = BATCHES[batch] if batch else cudart.copy_runs
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    current = torch.cuda.current_stream()
    if compute is not None:
        compute.queue()
    start.record(current)
    for stream in streams:
        stream.wait_stream(current)
    handles = [s.cuda_stream for s in streams]
    for rows in runs:
        for i in range(len(streams)):
            part = rows[i :: len(streams)]
            if len(part):
                copy(part, handles[i])
    for stream in streams:
        current.wait_stream(stream)
    end.record(current)
    end.synchronize()
    if compute is not None:
        compute.wait()
    num_bytes = int(sum(int((r[:, 2] * (r[:, 3] if run > 1 else 1)).sum()) for r in runs))
    return start.elapsed_time(end) / 1e3, num_bytes


def _consecutive_pages(pools: PagePools, host_pages: int, pages: int, run: int, rng) -> list[int]:
    """``pages`` host pages in runs of ``run`` consecutive ones, each run inside one host chunk, the runs in random
    order."""
    per_chunk = pools.host_chunk_pages // run
    slots = [chunk * pools.host_chunk_pages + i * run for chunk in range(host_pages // pools.host_chunk_pages)
             for i in range(per_chunk)]  # fmt: skip
    starts = rng.choice(slots, pages // run, replace=False)
    return [int(start) + i for start in starts for i in range(run)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.copy_runs_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=97, help="host pages a question stages")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--groups",
        default="1,2,4,8,13,26,8+8+6+4",
        help="layers a run holds, comma-separated; 8+8+6+4 is one staging in groups of those sizes (staging_groups)",
    )
    parser.add_argument("--streams", default="1,2,3,4", help="side streams sharing the runs, comma-separated")
    parser.add_argument(
        "--consecutive",
        default="",
        help="also stage pages in runs of this many consecutive pages, one strided copy per run, comma-separated",
    )
    parser.add_argument(
        "--batch", action="store_true", help="random pages also in one cudaMemcpyBatchAsync per group and stream"
    )
    parser.add_argument("--with-compute", action="store_true", help="every row also with matrix products beside it")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or not cudart.available():
        print("CUDA and its runtime are needed", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    spec, host_pages = SPEC_7B, 8 * args.pages
    page_bytes = spec.bytes_per_token * PAGE_TOKENS
    pools = PagePools(
        spec, page_tokens=PAGE_TOKENS, device=device, device_bytes=2 * args.pages * page_bytes,
        host_bytes=host_pages * page_bytes, pinned_host_bytes=host_pages * page_bytes,
        transfers=TransferEngine(device),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    src = [int(p) for p in rng.choice(host_pages, args.pages, replace=False)]
    dst = pools.take(Tier.DEVICE, args.pages)
    assert dst == list(range(dst[0], dst[0] + len(dst))), "a fresh device pool gives out consecutive pages"
    layers = range(2, spec.num_layers)  # the layers after the anchor at layer 1
    rows = []
    streams_all = [torch.cuda.Stream() for _ in range(max(int(n) for n in args.streams.split(",")))]
    compute = Compute(device) if args.with_compute else None
    beside = [None, compute] if compute is not None else [None]
    layouts = [("random pages", src, 1, "")]
    for run in (int(n) for n in args.consecutive.split(",") if n):
        consecutive = _consecutive_pages(pools, host_pages, args.pages - args.pages % run, run, rng)
        layouts += [
            (f"runs of {run}, a copy a page", consecutive, 1, ""),
            (f"runs of {run}, strided", consecutive, run, ""),
        ]
    if args.batch and not cudart.batch_available():
        print(f"--batch: no rows, the CUDA runtime here is {cudart.runtime_version()}, before 12.8", file=sys.stderr)
    elif args.batch:  # last: a new call, so the rows before it are printed whatever it does
        layouts += [(f"random pages, {name}", src, 1, name) for name in BATCHES]
    for pages_are, pages, run, batch in layouts:
        for group in args.groups.split(","):
            sizes = tuple(int(n) for n in group.split("+"))
            for num_streams in (int(n) for n in args.streams.split(",")):
                for busy in beside:
                    times = []
                    for _ in range(args.repeats + 2):
                        seconds, num_bytes = _staging_seconds(
                            pools, pages, dst[: len(pages)], sizes, streams_all[:num_streams], layers, run=run,
                            batch=batch, compute=busy,
                        )  # fmt: skip
                        times.append(seconds)
                    median = statistics.median(times[2:])
                    copies = len(pages) // run * len(layer_groups(layers, sizes))
                    rows.append({
                        "pages": pages_are, "layers_a_run": group, "streams": num_streams,
                        "beside_compute": busy is not None, "copies": copies, "bytes": num_bytes,
                        "ms": median * 1e3, "gbs": num_bytes / median / 1e9,
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    contiguous_src = torch.empty(max(row["bytes"] for row in rows), dtype=torch.uint8, pin_memory=True)
    contiguous_dst = torch.empty_like(contiguous_src, device=device)
    times = []
    for _ in range(args.repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        contiguous_dst.copy_(contiguous_src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    contiguous = {"bytes": contiguous_src.numel(), "ms": statistics.median(times[2:]) * 1e3}
    contiguous["gbs"] = contiguous["bytes"] / contiguous["ms"] / 1e6
    print(json.dumps({"one contiguous copy": contiguous}))
    report = {"pages": args.pages, "page_bytes": page_bytes, "rows": rows, "contiguous": contiguous}
    report["gpu"] = torch.cuda.get_device_name()
    report["cuda_runtime"] = cudart.runtime_version()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
