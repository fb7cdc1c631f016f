#!/usr/bin/env bash
# Whether the service's first run on a fresh GPU machine ingests less because host memory is slow the first time it
# is written (sessions 57 and 58: the first of two runs at 192 cameras was slower, in either order of the pinning
# settings). First bench.host_touch writes up to 96 GiB of host memory (for at most TOUCH_S seconds, 60 by default),
# gives it back and writes it again, timing both; then the service at 192 cameras, as the runs it is compared with, now
# on memory already written.
source "$(dirname "$0")/head.sh"
stage host-touch python3 -m bench.host_touch --gib 96 --chunk-gib 4 --max-s "${TOUCH_S:-60}" \
    --out "$OUT/host-touch.json"
stage service-ramp python3 -m mosaic_core.cli bench service --model qwen2.5-vl-7b --host 0.0.0.0 \
    --max-batch-frames 128 --cameras 192 --keep-going --warmup-s 15 --settle-s 20 --measure-s 25 \
    --start-timeout-s 160 --data-dir /dev/shm/mosaic-data --stack-probe --out "$OUT/service-ramp"
