#!/usr/bin/env bash
# Issue 15: the service at 150 cameras as shipped, then with --tower-stream --encode-ahead, a fresh service each,
# 60 s measured at one question a second; about 9 minutes.
source "$(dirname "$0")/head.sh"
stage service-default "${SERVICE_150[@]}" --out "$OUT/service-150-default"
stage service-ahead "${SERVICE_150[@]}" --tower-stream --encode-ahead --out "$OUT/service-150-ahead"
