"""bench/watches.py runs end to end on the CPU with small sizes, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_watches_prints_its_table_and_writes_json(tmp_path):
    out = tmp_path / "watches.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.watches", "--quick", "--cameras", "3", "--watches", "6", "--firing", "1",
         "--cooldown-s", "0", "--fps", "1", "--duration-s", "20", "--settle-s", "10", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seal to event p50 / p99" in result.stdout and "scoring per sealed cluster" in result.stdout
    report = json.loads(out.read_text())
    assert report["sealed_clusters_scored"] > 0
    assert report["evaluations"] == 6 * report["sealed_clusters_scored"]  # every sealed cluster, every watch
    assert report["events"] > 0 and report["seal_to_event_p50_s"] > 0
    assert (out.with_suffix(".txt")).read_text().startswith("cameras x fps")
