#!/usr/bin/env bash
# Issue 14's transfer rate in the engine: scenario A at 60 minutes, a question's staging copies as shipped (each
# group's runs in one cudaMemcpyBatchAsync, EngineConfig.staging_batch) beside one cudaMemcpyAsync a run
# (cluster-copy-a-call, the path before session 43), side by side in one process; about 300 s. Session 43's sweep
# outside the engine: 99% against 85% of one contiguous copy's rate (h200-s43-copy-runs.json).
source "$(dirname "$0")/head.sh"
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-copy-a-call --recall-questions 0 --out "$OUT/60min-A-staging-batch.json"
