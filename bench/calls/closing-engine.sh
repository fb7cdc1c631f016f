#!/usr/bin/env bash
# Issue 15's closing table, the engine alone: scenario B at 32, 64, 128, 192, 200 and 256 cameras of 1 fps, cluster
# mode (200: the target's own count; 192 and 256 are the issue's table), with the tower stream as shipped (off;
# TOWER_STREAM=on or off,on to change it); about 3 minutes a setting. The table before is session 22's
# (h200-s22-B.json) and session 27's (h200-s27-B.json). Since session 50 the cameras loop bikes.mp4 alone (CLIPS=
# names others): the three clips no longer fit a call beside the pack, and the tables before looped all three.
source "$(dirname "$0")/head.sh"
stage scenario-b python3 -m mosaic_core.cli bench engine --model qwen2.5-vl-7b --scenarios B --b-modes cluster \
    --camera-seconds 24 --cameras 32,64,128,192,200,256 --b-tower-stream "${TOWER_STREAM:-off}" \
    --b-clips "${CLIPS:-bikes.mp4}" \
    --out "$OUT/B-closing.json"
