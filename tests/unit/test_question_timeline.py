"""bench.question_timeline reads a question's trace into its timeline: copies, gaps and what ran before it."""

from __future__ import annotations

from bench.question_timeline import QUESTION_RANGE, timeline, trace_summary


def _event(cat, name, ts, dur, tid=0, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def _trace():
    return {
        "traceEvents": [
            _event("user_annotation", QUESTION_RANGE, 1000, 5000),
            _event("user_annotation", "question.setup", 1000, 400),
            _event("cuda_runtime", "cudaLaunchKernel", 500, 5, correlation=1),  # launched before the question
            _event("kernel", "ingest_kernel", 1000, 300, tid=7, correlation=1),
            _event("cuda_runtime", "cudaMemcpyAsync", 1500, 5, correlation=2),
            _event("cuda_runtime", "cudaMemcpyAsync", 1510, 5, correlation=3),
            _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1600, 100, tid=13, correlation=2, bytes=5_000_000),
            _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1700, 100, tid=13, correlation=3, bytes=5_000_000),
            _event("cuda_runtime", "cudaLaunchKernel", 1520, 5, correlation=4),
            _event("cuda_runtime", "cudaLaunchKernel", 1530, 5, correlation=5),
            _event("kernel", "layer", 1800, 100, tid=7, correlation=4),
            _event("kernel", "layer", 2400, 100, tid=7, correlation=5),  # 0.5 ms after the one before it
            _event("cuda_runtime", "cudaStreamSynchronize", 2000, 600),
        ]
    }


def test_the_timeline_counts_the_questions_own_copies_and_the_compute_streams_gaps():
    row = timeline(_trace())
    assert row["queued_before_ends_ms"] == 0.3, "the kernel launched before the question ends 0.3 ms in"
    assert row["copies"] == 2 and row["copy_bytes"] == 10_000_000
    assert row["copies_first_ms"] == 0.6 and row["copies_last_end_ms"] == 0.8
    assert row["copy_span_gbs"] == 50.0 and row["copy_busy_gbs"] == 50.0
    assert row["first_kernel_ms"] == 0.8 and row["last_kernel_end_ms"] == 1.5
    assert row["compute_gaps"] == [{"from_ms": 0.9, "ms": 0.5}]
    assert row["host_waits"] == [{"name": "cudaStreamSynchronize", "start_ms": 1.0, "ms": 0.6}]
    assert [r["name"] for r in row["host_ranges"]] == ["question.setup"]


def test_the_summary_merges_a_streams_back_to_back_copies_into_one_run():
    summary = trace_summary(_trace())
    runs = [line for line in summary.splitlines() if line.startswith("device stream  13")]
    assert len(runs) == 1 and "2 events" in runs[0] and "10.0 MB" in runs[0]
    assert "cudaStreamSynchronize" in summary
