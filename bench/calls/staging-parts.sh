#!/usr/bin/env bash
# Issue 14's transfer rate, taken apart (session 45), about 7 minutes:
# 1. The CUDA tests of the staging copies and their timing events (tests/unit/test_transfer.py), the slab gather,
#    and the question paths that stage (warm-up, graphs, adapter).
# 2. Scenario A at 60 minutes with every question's staging split into the layers that choose (each staging its own
#    choice, on the critical path) and the later layers staged at once from the anchor's choice, each part timed
#    with the host's preparation (the figure the headline's transfer rate has always used) and as its copies alone:
#    batched groups of 8, 8, 6 and 4 layers (the default since session 45), of 4 layers (before), and one
#    cudaMemcpyAsync a run, side by side.
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/unit/test_transfer.py tests/kernels/test_slab_gather.py tests/engine/test_retrieval_modes.py \
    tests/engine/test_warm_up.py tests/engine/test_prefill_graphs.py tests/engine/test_model_adapter.py \
    tests/engine/test_stage_table.py tests/engine/test_engine.py::test_staging_groups_of_any_size_give_the_same_answer
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-groups-of-4,cluster-copy-a-call --recall-questions 0 \
    --out "$OUT/60min-A-staging-parts.json"
