"""The soak's heap probe: growth is attributed to the source line that allocated, and files are read back."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

from services import heap_probe


def test_growth_names_the_line_that_allocated():
    tracemalloc.start()
    try:
        _, baseline = heap_probe.sample_line(None)
        kept = [bytes(1000) for _ in range(2000)]  # about 2 MB that stays alive
        line, _ = heap_probe.sample_line(baseline)
    finally:
        tracemalloc.stop()
    site, size, count = line["growth"][0]
    assert site.endswith("test_heap_probe.py:17") and size > 2_000_000 and count >= 2000
    assert line["traced_bytes"] > 2_000_000 and line["objects"] > 0
    del kept


def test_a_process_with_the_variable_set_writes_lines_that_read_back(tmp_path):
    code = (
        "import time; from services import heap_probe; "
        "assert heap_probe.start('worker-0') is not None; assert heap_probe.start('worker-0') is None; "
        "time.sleep(0.5)"
    )
    env = {heap_probe.ENV_DIR: str(tmp_path), heap_probe.ENV_INTERVAL: "0.1", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    files = list(tmp_path.glob("heap-worker-0-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) >= 2
    latest = heap_probe.read_latest(tmp_path, "worker-*")
    assert latest == json.loads(files[0].read_text().splitlines()[-1])
    assert heap_probe.read_latest(tmp_path, "router") is None


def test_nothing_is_traced_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(heap_probe.ENV_DIR, raising=False)
    assert heap_probe.start("router") is None and not tracemalloc.is_tracing()


def test_growth_waits_for_the_baseline(tmp_path):
    code = "import time; from services import heap_probe; heap_probe.start('router'); time.sleep(0.4)"
    env = {heap_probe.ENV_DIR: str(tmp_path), heap_probe.ENV_INTERVAL: "0.1", heap_probe.ENV_BASELINE: "60"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    lines = [json.loads(t) for t in next(tmp_path.glob("heap-router-*.jsonl")).read_text().splitlines()]
    assert len(lines) >= 2 and all(line["growth"] == [] and line["traced_bytes"] > 0 for line in lines)
