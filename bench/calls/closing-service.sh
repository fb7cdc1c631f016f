#!/usr/bin/env bash
# Issue 15's closing table through the service: one service for a ramp of 32, 64, 128, 150, 192 and 256 cameras of
# 1 fps with a question a second, every step measured (--keep-going); about 9 minutes. EXTRA adds flags (for example
# EXTRA="--no-tower-stream --no-encode-ahead", the defaults before session 38); CAMERAS names another ramp (a
# shorter one fits less device time). The ramp before is session 22's (h200-s22-service-ramp.*).
source "$(dirname "$0")/head.sh"
# shellcheck disable=SC2086  # EXTRA is a list of flags
stage service-ramp python3 -m mosaic_core.cli bench service --model qwen2.5-vl-7b --host 0.0.0.0 \
    --max-batch-frames 128 --cameras "${CAMERAS:-32,64,128,150,192,256}" --keep-going --warmup-s 15 --settle-s 20 --measure-s 25 \
    --start-timeout-s 160 --data-dir /dev/shm/mosaic-data --stack-probe ${EXTRA:-} --out "$OUT/service-ramp"
