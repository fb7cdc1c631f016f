#!/usr/bin/env bash
# Issue 14's batched decode: decode ms/step and tokens/s with 1, 2, 4, 8 and 16 answers at once on different
# cameras, one at a time against batched, on one engine; about 2 minutes. The cameras loop bikes.mp4 alone (carried
# with the pack; the three clips no longer fit a call beside it), where session 7's table (h200-decode-batch.json)
# looped all three.
source "$(dirname "$0")/head.sh"
# 44 GiB of device budget holds 16 answers' working sets beside 16 windows and fits an H100 as well (the bench's
# default of 80 GiB, session 7's on the H200, does not: h100-s51-decode-batch-first-attempt.log).
stage decode python3 -m mosaic_core.cli bench decode --clips bikes.mp4 --device-budget-gib 44 \
    --out "$OUT/decode-batch.json"
