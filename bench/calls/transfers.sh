#!/usr/bin/env bash
# Issue 14's transfer rate (67-74% of PCIe peak in the engine, >= 90% wanted): where the copies lose it, about 3
# minutes. The staging sweep, outside the engine, by layers a copy holds and side streams, each row also beside
# matrix products on another stream (a question's layers compute while its pages move), and over pages in runs of
# 4 and 16 consecutive ones, one strided copy a run (what a consecutive layout of a cluster's pages would buy), and
# each stream's runs of a group in one cudaMemcpyBatchAsync call, with and without its overlap hint (--batch).
# Then the copy tests on CUDA, the strided and batched copies' among them.
source "$(dirname "$0")/head.sh"
stage copy-runs python3 -m bench.copy_runs_sweep --groups 4,8+8+6+4,26 --streams 1,2 --consecutive 4,16 \
    --batch --with-compute --out "$OUT/copy-runs.json"
MOSAIC_TEST_DEVICE=cuda stage copy-tests python3 -m pytest -q -p no:cacheprovider --tb=short \
    tests/kernels/test_slab_gather.py tests/unit/test_transfer.py
