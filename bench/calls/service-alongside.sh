#!/usr/bin/env bash
# Issue 15: the service at 150 cameras as shipped, then with questions started at a pause run beside the queued
# ingest chunks (--questions-alongside-ingest), a fresh service each; about 9 minutes.
source "$(dirname "$0")/head.sh"
stage service-default "${SERVICE_150[@]}" --out "$OUT/service-150-default"
stage service-alongside "${SERVICE_150[@]}" --questions-alongside-ingest --out "$OUT/service-150-alongside"
