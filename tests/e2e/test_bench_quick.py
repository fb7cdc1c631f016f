"""The benchmark's --quick mode runs on CPU with the tiny preset, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_every_table_and_writes_json(tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for title in ("Scenario A", "Recall against chance", "Scenario B", "Scenario C", "Targets"):
        assert title in result.stdout
    report = json.loads(out.read_text())
    a = report["A"]
    assert set(a) == {"full", "rekv-token", "frame", "cluster", "random"}
    # equal machinery: frame blocks share layer 1's choice like clusters; the ReKV-style row scores every layer
    assert a["frame"]["layers_scored"] == a["cluster"]["layers_scored"] == 2
    assert a["rekv-token"]["layers_scored"] == 4
    # the ReKV-style row keeps its blocks on the host, so every retrieved block is copied and none hits the cache
    assert a["rekv-token"]["hit_ratio"] == 0.0 and a["rekv-token"]["bytes_per_question"] > 0
    # planted probes: the plant works, and Mosaic's scorer finds planted spans far more often than chance
    assert a["cluster"]["probe_span_mass"] > 0.3
    assert a["cluster"]["probe_found"] >= a["random"]["probe_found"] + 0.3
    assert a["cluster"]["probe_found"] >= a["cluster"]["probe_found_by_scorer"]["random"] + 0.3
    assert a["frame"]["probe_found"] >= a["frame"]["probe_found_by_scorer"]["random"] + 0.3
    # the budget is below the history, so retrieval must differ from full, measurably but not wildly
    for label in ("rekv-token", "frame", "cluster", "random"):
        assert 0.0 < a[label]["hidden_rel_error"] < 1.0 and a[label]["kl_vs_full"] >= 0.0
        assert a[label]["recall"] is not None and 0.0 < a[label]["recall"] <= 1.0
    assert a["full"]["kl_vs_full"] == 0.0
    assert set(report["B"]) == {"token", "cluster"}
    assert all(r["hit_ratio"] is not None for r in report["B"].values())


def test_bench_engine_runs_scenario_b_for_each_count_of_cameras_and_tower_stream_on_one_model(tmp_path):
    out = tmp_path / "b.json"
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", "bench", "engine", "--quick", "--scenarios", "B", "--b-modes",
         "cluster", "--cameras", "2,3", "--b-tower-stream", "off,on", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("loading tiny") == 1
    rows = json.loads(out.read_text())["B"]
    assert {name: row["cameras"] for name, row in rows.items()} == {
        "cluster 2 cameras": 2,
        "cluster tower-stream 2 cameras": 2,
        "cluster 3 cameras": 3,
        "cluster tower-stream 3 cameras": 3,
    }
    assert not any(row["tower_stream"] for row in rows.values()), "on the CPU no tower stream runs"
    assert all(row["real_time"] == (row["ingest_pass_ms"] <= 1e3) for row in rows.values())
    assert all(row["stored_digest"]["clusters"] > 0 for row in rows.values())
    # the digests' plumbing: on the CPU both rows of a count take one path, so they must agree
    assert [row["stored_as_tower_off"] for row in rows.values()] == [None, True, None, True]
    assert "| real-time (pass <= 1 s)" in result.stdout


def test_bench_decode_quick_steps_answers_together_only_when_batched(tmp_path):
    out = tmp_path / "decode.json"
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", "bench", "decode", "--quick", "--concurrency", "1,2",
         "--decode-tokens", "6", "--clips", "bikes.mp4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| answers | one at a time" in result.stdout
    report = json.loads(out.read_text())
    assert report["clips"] == ["bikes.mp4"]
    rows = {row["concurrent_answers"]: row for row in report["rows"]}
    assert rows[2]["one_at_a_time"]["graph_steps"] == 2 * 5  # two answers of 6 tokens: 5 steps each
    assert rows[2]["batched"]["graph_steps"] == 5  # both in every step
    assert rows[2]["batched"]["tokens_decoded"] == 10
    assert rows[1]["batched"]["graph_steps"] == rows[1]["one_at_a_time"]["graph_steps"] == 5


@pytest.mark.parametrize("backend", [None, "math"])
def test_bench_vision_quick_rows_compute_what_transformers_computes(tmp_path, backend):
    out = tmp_path / "vision.json"
    held = ["--sdpa-backend", backend] if backend else []
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", "bench", "vision", "--quick", "--repeats", "1", "--out", str(out),
         *held],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precomputed-inputs" in result.stdout
    report = json.loads(out.read_text())
    assert report["sdpa_backend"] == (backend or "default")
    rows = report["rows"]
    assert list(rows) == ["transformers", "batched-chunks", "precomputed-inputs", "padded-mlp", "matmul-patch-embed"]
    for by_size in rows.values():
        assert set(by_size) == {"2", "4"}
        assert all(r["max_abs_diff_vs_transformers"] < 1e-4 and r["frames_per_s"] > 0 for r in by_size.values())


def test_bench_sampled_engine_runs_scenario_b_with_pause_variants_and_writes_where_its_thread_was(tmp_path):
    out, stacks = tmp_path / "b.json", tmp_path / "stacks.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench.sampled_engine", str(stacks), "--quick", "--scenarios", "B", "--b-modes",
         "cluster", "--b-pauses", "off,every2-skip-idle", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["B"]
    assert set(rows) == {"cluster off", "cluster every2-skip-idle"}
    assert all(r["ingest_only_unix_s"][0] < r["ingest_only_unix_s"][1] for r in rows.values())
    inclusive = json.loads(stacks.read_text().splitlines()[-1])["inclusive"]
    # Not a frame's placement: short host work that holds the GIL, which a 5-ms sampler may miss in a run this
    # short (one fresh-clone run in session 34 did).
    assert 0 < inclusive["ingest.py:ingest"] < inclusive["scenario_b.py:scenario_b"]
