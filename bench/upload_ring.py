"""Host time of one small upload (``transfer.upload``'s tables): a pinned block of its own against the upload ring.

    python -m bench.upload_ring [--calls 2000] [--busy-ms 50] --out FILE.json

For int64 tables of 16, 256, 4,096 and 65,536 values, times ``--calls`` uploads by each path with the wall clock,
in chunks: before each chunk the device is given ``--busy-ms`` of queued matmuls, so the copies queue behind them
and what is timed is the host's work (as in the service, where the device is rarely idle). A chunk never fills
more of the ring than it holds less two segments, so the ring does not wait on the queued work either; the old
path's freed blocks cannot be reused while it runs, as in the service. ``device_busy`` is the share of chunks at
whose end the matmuls were still running (below 1: raise ``--busy-ms``). Each path warms up once first. The
last upload of each chunk is checked against its values. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mosaic_core.memory.upload_ring import UploadRing, pinned_upload

SIZES = (16, 256, 4096, 65536)
MAX_CHUNK = 250  # with the matmuls, well inside the device's queue of launches (a full queue blocks the host)


def busy_matmuls(ms: float, a: torch.Tensor, out: torch.Tensor, per_matmul_ms: float) -> torch.cuda.Event:
    """Queues about ``ms`` of matmuls on the current stream; the event passes when they are done."""
    for _ in range(max(1, math.ceil(ms / per_matmul_ms))):
        torch.mm(a, a, out=out)
    done = torch.cuda.Event()
    done.record()
    return done


def time_path(upload, num_values: int, calls: int, chunk: int, busy) -> tuple[float, float]:
    """Microseconds per upload over ``calls`` uploads, and the share of chunks the device stayed busy through."""
    tables = [np.arange(num_values, dtype=np.int64) + i for i in range(chunk)]
    seconds, busy_chunks, num_chunks = 0.0, 0, 0
    for first in range(0, calls, chunk):
        n = min(chunk, calls - first)
        torch.cuda.synchronize()
        done = busy()
        start = time.perf_counter()
        for k in range(n):
            last = upload(tables[k], torch.int64)
        seconds += time.perf_counter() - start
        busy_chunks += not done.query()
        num_chunks += 1
        torch.cuda.synchronize()
        if not np.array_equal(last.cpu().numpy(), tables[n - 1]):
            raise RuntimeError(f"the last upload of a chunk ({num_values} values) came back with other values")
    return 1e6 * seconds / calls, busy_chunks / num_chunks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_ring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--busy-ms", type=float, default=50.0, help="matmuls queued before each chunk of uploads")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.upload_ring needs CUDA: it times uploads to a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    ring = UploadRing(device)
    paths = {
        "pinned block": lambda values, dtype: pinned_upload(values, dtype, device),
        "ring": ring.upload,
    }
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)  # ~2 ms a matmul: few launches keep it busy
    out = torch.empty_like(a)
    busy_matmuls(1.0, a, out, 1.0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        torch.mm(a, a, out=out)
    end.record()
    end.synchronize()
    per_matmul_ms = start.elapsed_time(end) / 20
    busy = partial(busy_matmuls, args.busy_ms, a, out, per_matmul_ms)

    rows = []
    for num_values in SIZES:
        slice_bytes = -(-num_values * 8 // 256) * 256
        room = (ring.segments.num_segments - 2) * (ring.segments.segment_bytes // slice_bytes)
        chunk = max(1, min(MAX_CHUNK, args.calls, room))
        row = {"num_values": num_values, "table_bytes": num_values * 8, "chunk": chunk}
        for name, upload in paths.items():
            time_path(upload, num_values, min(args.calls, 4 * chunk), chunk, busy)  # warm-up
            us, busy_share = time_path(upload, num_values, args.calls, chunk, busy)
            row[name] = {"us_per_upload": us, "device_busy": busy_share}
        rows.append(row)

    print(f"{torch.cuda.get_device_name(device)}, {args.calls} uploads per case, µs per upload (host wall clock)")
    print(f"{'values':>8} {'bytes':>8} {'pinned block':>13} {'ring':>8} {'speed-up':>9} {'device busy':>12}")
    for row in rows:
        old, new = row["pinned block"], row["ring"]
        busy_share = min(old["device_busy"], new["device_busy"])
        print(
            f"{row['num_values']:>8,} {row['table_bytes']:>8,} {old['us_per_upload']:>13.2f} "
            f"{new['us_per_upload']:>8.2f} {old['us_per_upload'] / new['us_per_upload']:>8.2f}x {busy_share:>11.0%}"
        )
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "calls": args.calls,
        "busy_ms": args.busy_ms,
        "per_matmul_ms": per_matmul_ms,
        "ring": {"capacity_bytes": ring.segments.capacity_bytes, "num_segments": ring.segments.num_segments},
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
