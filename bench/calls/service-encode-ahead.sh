#!/usr/bin/env bash
# Issue 15: the service at 150 cameras with --no-tower-stream --no-encode-ahead (the defaults before session 38), then
# as shipped (both on), a fresh service each, 60 s measured at one question a second; about 9 minutes.
source "$(dirname "$0")/head.sh"
stage service-without "${SERVICE_150[@]}" --no-tower-stream --no-encode-ahead --out "$OUT/service-150-without"
stage service-shipped "${SERVICE_150[@]}" --out "$OUT/service-150-shipped"
