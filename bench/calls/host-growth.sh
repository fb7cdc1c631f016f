#!/usr/bin/env bash
# Whether pinning the host pool's next chunk ahead, on a thread of its own, takes its time out of the engine thread
# (the 100-ms stalls inside keep_host_copy at 256 cameras on the H100), under a minute: the arena's pools with the
# 7B model's pages take a window of 8 pages every 50 ms (about 1.1 GB/s, as there) until 4 GiB are pinned, once with
# the chunks pinned on the engine thread and once ahead, side by side. Then the growth tests on CUDA (pinned chunks).
source "$(dirname "$0")/head.sh"
stage host-growth python3 -m bench.host_growth --gib 4 --window-pages 8 --every-ms 50 --out "$OUT/host-growth.json"
MOSAIC_TEST_DEVICE=cuda stage host-growth-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/unit/test_host_growth.py
