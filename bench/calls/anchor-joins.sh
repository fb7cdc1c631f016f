#!/usr/bin/env bash
# Session 50's staging change checked on whatever card comes, about 5 minutes: the CUDA tests of the staging paths,
# then scenario A at 60 minutes with the anchor's own layer in the first group's runs (cluster, the default) and
# staged alone (cluster-anchor-alone, before), side by side in one process. staging-parts.sh is the fuller call.
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/engine/test_retrieval_modes.py tests/engine/test_stage_table.py \
    tests/engine/test_engine.py::test_staging_groups_of_any_size_give_the_same_answer
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-anchor-alone --recall-questions 0 --out "$OUT/60min-A-anchor-joins.json"
