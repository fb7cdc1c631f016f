#!/usr/bin/env bash
# Issue 14's open figures in one call, about 5 minutes: the batched-decode table (tokens/s of 1 to 16 answers at once
# against one answer alone; the target is 6x at 8), then scenario A at 60 minutes with the staging taken apart
# (the transfer rate, >= 90% of PCIe, beside TTFT, the bare question forward and decode), as decode-batch.sh and
# staging-parts.sh run them, without the latter's CUDA tests, to fit a call beside the service ramp's.
source "$(dirname "$0")/head.sh"
stage decode python3 -m mosaic_core.cli bench decode --clips bikes.mp4 --device-budget-gib 44 \
    --out "$OUT/decode-batch.json"
stage scenario-a python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --minutes 60 --questions 20 \
    --scenarios A --variants cluster,cluster-groups-of-4,cluster-copy-a-call --recall-questions 0 \
    --out "$OUT/60min-A-staging-parts.json"
