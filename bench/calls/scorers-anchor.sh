#!/usr/bin/env bash
# Issue 14: scenario A at 60 minutes, one process, cluster first: the share scorer (cluster), the old scorer
# (cluster-spread) and every layer taking layer 0's choice (cluster-anchor-0), for TTFT, bytes moved and the
# transfer rate side by side; about 400 s.
source "$(dirname "$0")/head.sh"
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-spread,cluster-anchor-0 --recall-questions 0 \
    --out "$OUT/60min-A-scorers-anchor.json"
