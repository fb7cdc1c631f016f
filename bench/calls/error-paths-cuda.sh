#!/usr/bin/env bash
# Session 46's error-path fixes under CUDA, about 4 minutes:
# 1. The tests of frames held back when their cluster cannot be stored (a disk that refuses, a pinned allocation
#    that fails), merges and splits that store their copy before removing the old clusters, the disk tier, durable
#    history, splits, the upkeep after an answer, and the engine's own tests.
# 2. Scenario A at 60 minutes, cluster mode alone: merges now ask for room beside the clusters they replace, so the
#    question path's figures are checked against this session's call 1 (another machine: compare with care).
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/unit/test_failed_moves.py tests/unit/test_window_store_without_room.py \
    tests/engine/test_replacing_without_room.py tests/engine/test_disk_tier.py tests/engine/test_durable_history.py \
    tests/engine/test_splits.py tests/engine/test_answer_after_upkeep_failure.py tests/engine/test_engine.py
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster --recall-questions 0 --out "$OUT/60min-A-cluster.json"
