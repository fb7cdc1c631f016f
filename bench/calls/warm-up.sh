#!/usr/bin/env bash
# Whether the warm-up covers users' first questions (session 41: graphs keyed by the widest table of the stream,
# and the warm-up's questions over a scratch history), about 6 minutes.
# 1. The warm-up, graph and adapter tests on CUDA (the adapter's reload test failed on the H100 in session 40; its
#    message now says by how much).
# 2. A fresh service at 32 cameras, measured from 15 s after its start, as the first step of session 40's ramp was
#    (TTFT p99 538 ms there, from captures and compiles in the first questions). The worker's log says how long the
#    warm-up took and whether its questions had history.
source "$(dirname "$0")/head.sh"
MOSAIC_TEST_DEVICE=cuda stage cuda-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/engine/test_warm_up.py tests/engine/test_decode_graphs.py tests/engine/test_prefill_graphs.py \
    tests/engine/test_model_adapter.py
stage service-32 python3 -m mosaic_core.cli bench service --model qwen2.5-vl-7b --host 0.0.0.0 \
    --max-batch-frames 128 --cameras 32 --warmup-s 15 --settle-s 20 --measure-s 25 --start-timeout-s 200 \
    --data-dir /dev/shm/mosaic-data --stack-probe --out "$OUT/service-32"
