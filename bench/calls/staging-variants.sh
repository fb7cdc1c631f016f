#!/usr/bin/env bash
# Issue 14: scenario A at 60 minutes, a question's staging copies as shipped, dealt to two copy streams, and in
# tapered groups (8, 8, 6, 4 layers), side by side in one process, for the transfer rate; about 400 s. (Since session
# 45 the tapered groups are cluster's default, so its row and cluster-tapered-staging's are the same machinery.)
source "$(dirname "$0")/head.sh"
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-two-copy-streams,cluster-tapered-staging --recall-questions 0 \
    --out "$OUT/60min-A-staging.json"
