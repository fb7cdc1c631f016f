"""The benchmark's --quick mode runs on CPU with the tiny preset, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_every_table_and_writes_json(tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for title in ("Scenario A", "Scenario B", "Scenario C", "Decode: re-scoring interval", "Targets:"):
        assert title in result.stdout
    report = json.loads(out.read_text())
    # the default cluster config, and the other ways of choosing later layers' clusters on the same stream
    assert set(report["A"]) == {"full", "token", "cluster", "cluster/per-layer", "cluster/prefetch@0"}
    assert report["A"]["cluster"]["layers_scored"] == 2 and report["A"]["cluster/per-layer"]["layers_scored"] == 4
    assert set(report["decode"]) == {"0", "8", "4", "1"}
    assert report["A"]["full"]["recall"] == 1.0
    assert report["A"]["token"]["copies_per_question"] > 0  # the baseline copies block by block
    assert set(report["B"]) == {"token", "cluster"}
