#!/usr/bin/env bash
# Session 46's durable-history fixes on CUDA, about 2 minutes: the pinned staging arena (a split's second half never
# waits for room only its first half could leave), snapshots taken from device pages, splits, restores (a record the
# disk fails to read at two starts, a set-aside stream's numbers retired) and reopened stream ids.
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/unit/test_staging_arena.py tests/unit/test_snapshot_pages.py tests/engine/test_splits.py \
    tests/engine/test_durable_history.py tests/engine/test_restore_isolation.py tests/engine/test_reopened_stream_ids.py
