#!/usr/bin/env bash
# Issue 15: the service at 150 cameras with the bench's ingest calls of up to 128 frames, then with the service's own
# default of 64 (ServiceConfig.max_batch_frames, what a deployment gets), a fresh service each, 60 s measured at one
# question a second; about 7 minutes. A later --max-batch-frames wins over SERVICE_150's.
source "$(dirname "$0")/head.sh"
stage service-batch-128 "${SERVICE_150[@]}" --out "$OUT/service-150-batch-128"
stage service-batch-64 "${SERVICE_150[@]}" --max-batch-frames 64 --out "$OUT/service-150-batch-64"
