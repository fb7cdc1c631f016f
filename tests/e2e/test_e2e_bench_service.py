"""``mosaic bench service --quick``: a real local service (Redis, Ray worker, gRPC) under pulled and pushed cameras
and questions, measured step by step; the report's files hold what the run saw."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("ray")
    from mosaic_core.cli import main

    prefix = tmp_path_factory.mktemp("bench-service") / "quick"
    assert main(["bench", "service", "--quick", "--out", str(prefix)]) == 0
    return json.loads(prefix.with_suffix(".json").read_text()), prefix.with_suffix(".txt").read_text()


def test_every_step_ingests_both_kinds_of_camera_and_answers_questions(report):
    data, _ = report
    steps = data["steps"]
    assert [s["cameras"] for s in steps][:1] == [2], "the ramp starts at 2 cameras"
    for step in steps:
        assert step["pulled"] >= 1 and step["pushed"] >= 1, step
        assert step["ingested_fps"] > 0, f"nothing was ingested at N={step['cameras']}"
        assert step["lag_p99_s"] is not None and step["lag_p99_s"] >= step["lag_p50_s"] >= 0
        assert step["questions"] > 0, f"no question was answered at N={step['cameras']}: {step['question_errors']}"
        assert 0 < step["ttft_p50_ms"] <= step["ttft_p99_ms"]
        assert step["worker_cpu_per_s"] > 0 and step["decode_cpu_estimate_per_s"] > 0
        assert step["decode_cpu_per_s"] > 0, "the pulled sources' decoding processes were not measured"
        # every figure of the rule was read: arrivals, the backlog's trend, each camera's lag, the frames' way to KV
        assert step["received_fps"] > 0 and step["backlog_growth_frames"] is not None, step
        assert step["lag_unknown_cameras"] == [] and step["worst_camera_lag_p99_s"] >= 0, step
        assert 0 < step["ingest_latency_p50_s"] <= step["ingest_latency_p99_s"], step
        assert step["questions_sent"] >= step["questions"] and step["questions_nominal"] > 0, step
        assert sum(c["sent"] for c in step["push_by_client"]) == step["push_sent"] > 0, step
        # the parts of the first token outside the engine thread, and the tiers, come from the real service
        assert 0 < step["transport_p50_ms"] <= step["transport_p99_ms"], step
        assert all(0 < q["transport"] < q["server"] for q in step["ttft_samples_ms"]), step["ttft_samples_ms"]
        assert step["tiers"]["capacity_gib:device"] == 16 / 1024, step["tiers"]  # --quick's 16 MiB
        assert 0 < step["tiers"]["used_gib:device"] <= step["tiers"]["capacity_gib:device"], step["tiers"]


def test_the_largest_real_time_n_follows_the_rule(report):
    data, text = report
    assert all(s["real_time"] == (not s["failures"]) for s in data["steps"])
    passing = [s["cameras"] for s in itertools.takewhile(lambda s: s["real_time"], data["steps"])]
    assert data["largest_real_time_cameras"] == max(passing, default=0)
    assert f"largest real-time N: {data['largest_real_time_cameras']} (" in text
    # the ramp stops at the first step that is not real-time
    assert all(s["real_time"] for s in data["steps"][:-1])
    settings = data["settings"]
    assert (settings["retention_s"], settings["max_new_tokens"], settings["questions_per_s"]) == (20.0, 4, 0.5)
    assert "retention 20.0 s, 4 tokens per answer" in text
