#!/usr/bin/env bash
# Whether pinning the host pool's next chunk ahead, on a thread of its own, takes its time out of the engine thread
# (the 100-ms stalls inside keep_host_copy at 256 cameras on the H100), in about 2 minutes: the arena's pools with
# the 7B model's pages take a window of 8 pages every 50 ms (about 1.1 GB/s, as there) until 4 GiB are pinned, once
# with the chunks pinned on the engine thread and once ahead, side by side; first with torch's own pinning
# (cudaHostAlloc, which holds the driver and so the engine thread's CUDA calls), then pinned as the engine has torch
# pin (pages faulted in first, then cudaHostRegister). Then the growth tests on CUDA (pinned chunks) and engine tests
# that stage host pages, whose chunks are then registered memory.
source "$(dirname "$0")/head.sh"
stage host-growth-alloc python3 -m bench.host_growth --gib 4 --window-pages 8 --every-ms 50 --pin-by alloc \
    --out "$OUT/host-growth-alloc.json"
stage host-growth-register python3 -m bench.host_growth --gib 4 --window-pages 8 --every-ms 50 --pin-by register \
    --out "$OUT/host-growth-register.json"
MOSAIC_TEST_DEVICE=cuda stage host-growth-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/unit/test_host_growth.py tests/engine/test_stage_table.py \
    tests/engine/test_ingest_pauses.py::test_what_work_at_a_pause_allocates_can_be_written_after_the_call
