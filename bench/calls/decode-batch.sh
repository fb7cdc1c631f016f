#!/usr/bin/env bash
# Issue 14's batched decode: decode ms/step and tokens/s with 1, 2, 4, 8 and 16 answers at once on different
# cameras, one at a time against batched, on one engine; about 4 minutes. The cameras loop bikes.mp4 alone (carried
# with the pack; the three clips no longer fit a call beside it), where session 7's table (h200-decode-batch.json)
# looped all three.
source "$(dirname "$0")/head.sh"
stage decode python3 -m mosaic_core.cli bench decode --clips bikes.mp4 --out "$OUT/decode-batch.json"
