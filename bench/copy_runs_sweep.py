"""How fast the copy engines stage a question's retrieved pages, by run size and by how many side streams share them.

    python -m bench.copy_runs_sweep [--pages 97] [--repeats 20] --out FILE.json      # CUDA only

A question at 60 minutes of history (scenario A, the 7B shape) stages about 97 host pages into device pages for 26
layers: one ``cudaMemcpyAsync`` per page and group of layers (``EngineConfig.prefill_graph_layers``, 4), about 680
runs of 1 MB each (``mosaic_core.memory.cudart``). On the H200 one such run took 21.6 us in a profiled question,
48 GB/s, where one 256-MiB copy reaches 55. This script times the same copies outside the engine, from the arena's
own pools (pages in random order, as a question finds them): for each group size (layers a run holds) and each
number of side streams (runs dealt round-robin to them, all waited for at the end), the median over ``--repeats``
of the whole staging's time and its GB/s, next to one contiguous copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.retrieval import layer_groups
from mosaic_core.memory import cudart
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC_7B = KVSpec(num_layers=28, num_kv_heads=4, num_q_heads=28, head_dim=128, dtype=torch.bfloat16)
PAGE_TOKENS = 126


def _staging_seconds(pools: PagePools, src: list[int], dst: list[int], sizes: tuple, streams: list, layers: range):
    """One staging of ``layers`` of ``src`` into ``dst``: runs of ``sizes`` layers (``layer_groups``) dealt to
    ``streams``."""
    groups = layer_groups(layers, sizes)
    runs = [pools.block_rows(Tier.HOST, src, dst, g) for g in groups]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    current = torch.cuda.current_stream()
    start.record(current)
    for stream in streams:
        stream.wait_stream(current)
    handles = [s.cuda_stream for s in streams]
    for rows in runs:
        for i in range(len(streams)):
            part = rows[i :: len(streams)]
            if len(part):
                cudart.copy_runs(part, handles[i])
    for stream in streams:
        current.wait_stream(stream)
    end.record(current)
    end.synchronize()
    num_bytes = int(sum(int(r[:, 2].sum()) for r in runs))
    return start.elapsed_time(end) / 1e3, num_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copy_runs_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=97, help="host pages a question stages")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--groups",
        default="1,2,4,8,13,26,8+8+6+4",
        help="layers a run holds, comma-separated; 8+8+6+4 is one staging in groups of those sizes (staging_groups)",
    )
    parser.add_argument("--streams", default="1,2,3,4", help="side streams sharing the runs, comma-separated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
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
    layers = range(2, spec.num_layers)  # the layers after the anchor at layer 1
    rows = []
    streams_all = [torch.cuda.Stream() for _ in range(max(int(n) for n in args.streams.split(",")))]
    for group in args.groups.split(","):
        sizes = tuple(int(n) for n in group.split("+"))
        for num_streams in (int(n) for n in args.streams.split(",")):
            streams = streams_all[:num_streams]
            times = []
            for _ in range(args.repeats + 2):
                seconds, num_bytes = _staging_seconds(pools, src, dst, sizes, streams, layers)
                times.append(seconds)
            median = statistics.median(times[2:])
            rows.append({
                "layers_a_run": group, "streams": num_streams, "runs": args.pages * len(layer_groups(layers, sizes)),
                "bytes": num_bytes, "ms": median * 1e3, "gbs": num_bytes / median / 1e9,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    contiguous_src = torch.empty(rows[-1]["bytes"], dtype=torch.uint8, pin_memory=True)
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
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
