#!/usr/bin/env bash
# Issue 15: the vision tower on its own CUDA stream (EngineConfig.tower_stream), about 7 minutes.
# 1. The tower-stream and pause tests on CUDA: a failure means the language model read the tower's outputs unwritten.
# 2. Scenario B at 192 and 256 cameras, tower stream off and on side by side. Read each "on" row's
#    stored_as_tower_off before its speed: false means the two rows stored different clusters (a race).
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage tower-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/engine/test_tower_stream.py tests/engine/test_ingest_pauses.py tests/engine/test_vision_chunk_plans.py || exit 1
stage scenario-b python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --scenarios B --b-modes cluster \
    --camera-seconds 24 --cameras 192,256 --b-tower-stream off,on --b-clips bikes.mp4 --out "$OUT/B-tower-stream.json"
