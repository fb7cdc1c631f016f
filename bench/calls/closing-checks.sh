#!/usr/bin/env bash
# Session 44's checks, about 7 minutes:
# 1. The engine's CUDA paths under test: the warm-up, graphs and adapter (the adapter's reload test failed on the
#    H100 in session 40), the staging copies, and frames that find no room to leave the window (c8eac8f).
# 2. Issue 14's transfer rate in the engine with batched staging (the default since session 43) in groups of 4
#    layers, in tapered groups (8, 8, 6, 4) and those dealt to two streams, beside one cudaMemcpyAsync a run, side
#    by side in one process (scenario A at 60 minutes).
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/engine/test_warm_up.py tests/engine/test_decode_graphs.py tests/engine/test_prefill_graphs.py \
    tests/engine/test_model_adapter.py tests/unit/test_transfer.py tests/kernels/test_slab_gather.py \
    tests/unit/test_window_store_without_room.py
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-copy-a-call,cluster-tapered-staging,cluster-tapered-two-streams \
    --recall-questions 0 --out "$OUT/60min-A-staging.json"
