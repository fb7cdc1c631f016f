"""What a small host-to-device upload (``memory.transfer.upload``: slot tables, page ids) costs the calling thread,
with torch pinning as the engine has it pin (``--pin-by register``: pages faulted in, then ``cudaHostRegister``) or
with torch's default (``alloc``: ``cudaHostAlloc``). One setting per process, since it is process-wide; run it once
for each, alternating, to see the run-to-run spread.

    python -m bench.upload_pinning --pin-by alloc
    python -m bench.upload_pinning --pin-by register

For each size (512 B, 32 KiB, 512 KiB of int64): 200 uploads to warm the caching host allocator, then 3,000 timed,
reported per call on the host alone and with the copies done. The uploads reuse the allocator's cached blocks once
it is warm, so this measures the steady state, not the first pinning of a size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mosaic_core.memory.host_growth import fault_pages_before_pinning
from mosaic_core.memory.transfer import upload

SIZES = (64, 4096, 65536)
WARM_CALLS = 200
TIMED_CALLS = 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pin-by", choices=("alloc", "register"), required=True, help="how torch pins host memory")
    mode = parser.parse_args().pin_by
    if mode == "register":
        fault_pages_before_pinning()
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    for size in SIZES:
        values = np.arange(size, dtype=np.int64)
        for _ in range(WARM_CALLS):
            upload(values, torch.int64, device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(TIMED_CALLS):
            upload(values, torch.int64, device)
        host_s = time.perf_counter() - start
        torch.cuda.synchronize()
        total_s = time.perf_counter() - start
        print(f"{mode:8s} {size * 8:>7d} bytes: {host_s / TIMED_CALLS * 1e6:7.1f} us a call on the host, "
              f"{total_s / TIMED_CALLS * 1e6:7.1f} us with the copies done", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
