"""Host time to prepare the staging of a question's later layers: one view per page and layer against one table.

    python -m bench.stage_host_time [--pages 95] [--layers 26]

At the 7B shape (28 layers, 4 KV heads, head_dim 128, bf16) with pages of 126 tokens, scenario A at 60 minutes
staged about 95 host pages per layer (``copies_per_question`` / 28). The layer-by-layer path builds, per layer,
a view of every source and destination page slab and checks each (``Retriever.reuse``, ``QuestionPlan._rebuild``,
``copy_slabs``' table rows); ``stage_shared`` computes one table for all layers from page numbers. This times
both host-side preparations on this machine's CPU, without copying anything. Off CUDA ``is_pinned`` does not ask
the driver, so the view path's figure here is a lower bound of what it costs next to a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.kernels.slab_gather import slab_table_rows
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC = KVSpec(num_layers=28, num_kv_heads=4, num_q_heads=28, head_dim=128, dtype=torch.bfloat16)


def per_view(pools: PagePools, src: list[int], dst: list[int], fills: list[int], layers: range) -> None:
    """What the layer-by-layer path prepares on the host: views, the pinned check, the checked rows."""
    for layer in layers:
        srcs = [pools.layer_slab(Tier.HOST, p, layer, f) for p, f in zip(src, fills, strict=True)]
        dsts = [pools.layer_slab(Tier.DEVICE, p, layer, f) for p, f in zip(dst, fills, strict=True)]
        all(s.is_pinned() for s in srcs)  # Retriever.stage asks before it picks the batched copy
        table, _ = slab_table_rows(srcs, dsts)
        torch.tensor(table, dtype=torch.int64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=95)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    page_bytes = SPEC.bytes_per_token * 126
    pools = PagePools(
        SPEC, page_tokens=126, device=torch.device("cpu"), device_bytes=(args.pages + 1) * page_bytes,
        host_bytes=(2 * args.pages + 1) * page_bytes, transfers=TransferEngine(torch.device("cpu")),
    )  # fmt: skip
    src = pools.take(Tier.HOST, 2 * args.pages)[1::2]  # every other page: scattered, as a history's are
    dst = pools.take(Tier.DEVICE, args.pages)
    fills, layers = [126] * args.pages, range(2, 2 + args.layers)
    timings = {"one view per page and layer": [], "one table from page numbers": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        per_view(pools, src, dst, fills, layers)
        t1 = time.perf_counter()
        rows = pools.stage_rows(Tier.HOST, src, fills, dst, layers)
        torch.from_numpy(np.ascontiguousarray(rows.reshape(-1, 5)))
        t2 = time.perf_counter()
        timings["one view per page and layer"].append(t1 - t0)
        timings["one table from page numbers"].append(t2 - t1)
    print(f"{args.pages} host pages x {args.layers} layers, median of {args.repeats}, this CPU")
    for name, values in timings.items():
        print(f"  {name}: {statistics.median(values) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
