"""The service benchmark's rules: what counts as real-time, the ramp's steps, the table."""

from __future__ import annotations

import argparse

import pytest

from mosaic_core.config import GIB
from services.bench_service_args import camera_steps
from services.bench_service_report import step_row, table
from services.bench_service_step import StepResult


def _step(
    cameras=8,
    lag_p99_s=0.5,
    dropped=0,
    refused=0,
    ingested_fps=None,
    stats_errors=None,
    question_errors=None,
    push_errors=None,
    **changes,
) -> StepResult:
    fields = dict(
        cameras=cameras, pulled=cameras // 2, pushed=cameras - cameras // 2, measure_s=30.0, offered_fps=cameras,
        received_fps=cameras, ingested_fps=cameras if ingested_fps is None else ingested_fps, lag_p50_s=0.1,
        lag_p99_s=lag_p99_s, lag_max_s=lag_p99_s, worst_camera_lag_p99_s=lag_p99_s, lag_unknown_cameras=[],
        backlog_growth_frames=3.0, max_batch_frames=128, load_edge_frames=cameras * 1.5, ingest_latency_p50_s=0.3,
        ingest_latency_p99_s=0.9, dropped=dropped, refused=refused, push_sent=cameras * 15, push_skipped=0,
        push_errors=push_errors or {}, stats_errors=stats_errors or {}, questions_nominal=30.0, questions_sent=30,
        questions_not_sent=0, questions_unfinished=0, questions=30, question_errors=question_errors or {},
        ttft_p50_ms=40.0, ttft_p99_ms=90.0, decode_ms_per_token=20.0, server_ttft_p50_ms=30.0, server_ttft_p99_ms=80.0,
        server_decode_ms_per_token=19.0, gpu_memory_used_mib=None, router_cpu_per_s=0.1, worker_cpu_per_s=0.9,
        decode_cpu_per_s=0.01, decode_cpu_estimate_per_s=0.012, engine_thread_share={"ingest": 0.6, "idle": 0.4},
        frames_per_ingest_call=cameras / 2, forward_passes_per_ingest_call=1.25, settled_after_s=None,
    )  # fmt: skip
    return StepResult(**{**fields, **changes})


def _report(*steps: StepResult, **step_changes) -> dict:
    return {
        "steps": [{**step_row(s), **step_changes} for s in steps],
        "largest_real_time_cameras": 8,
        "service": {"model": "qwen2.5-vl-7b"},
        "args": {"fps": 1.0, "questions_per_s": 1.0, "settle_s": 60.0},
        "start_s": 90.0,
        "decode_cost": {"jpeg_s": 0.0012, "video_s": 0.02, "frame_px": "640x272"},
    }


@pytest.mark.parametrize(
    ("changes", "real_time"),
    [({}, True), ({"lag_p99_s": 1.99}, True), ({"lag_p99_s": 2.0}, False), ({"lag_p99_s": None}, False),
     ({"dropped": 1}, False), ({"refused": 1}, False), ({"ingested_fps": 7.1}, False), ({"ingested_fps": 7.3}, True),
     ({"stats_errors": {"UNAVAILABLE": 1}}, False), ({"question_errors": {"INTERNAL": 7}}, False),
     ({"push_errors": {"UNAVAILABLE": 1}}, False)],
)  # fmt: skip
def test_real_time_means_lag_p99_under_2_s_nothing_lost_the_frames_arriving_and_every_request_served(
    changes, real_time
):
    assert _step(**changes).real_time is real_time


def test_camera_steps_must_increase():
    assert camera_steps("32,64,128") == [32, 64, 128]
    for bad in ("64,32", "0,8", "8,8", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            camera_steps(bad)


def test_durable_writers_is_refused_where_it_would_be_ignored():
    from services.bench_service import main_args

    assert main_args(["--durable-writers", "8"]).durable_writers == 8
    with pytest.raises(SystemExit):
        main_args(["--quick", "--durable-writers", "8"])  # the quick run keeps the tiny preset's engine settings


def test_table_has_a_row_per_step_and_names_the_largest_real_time_n():
    steps = [_step(8), _step(16, lag_p99_s=3.2)]
    report = _report(*steps)
    lines = table(report).splitlines()
    assert lines[0].split()[0] == "N"
    assert lines[1].split()[0] == "8" and lines[1].split()[-1] == "yes"
    assert lines[2].split()[0] == "16" and lines[2].split()[-1] == "no"
    assert lines[3].startswith("largest real-time N: 8 (a step is real-time when the lag p99, pooled and of the worst")
    assert (
        lines[-1] == "N=16: the worker's engine thread, seconds per second: ingest 0.60, idle 0.40; frames per "
        "ingest call: 8.0, forward passes per call: 1.25"
    )
    assert lines[-2] == "N=16: every lag under 2 s never within 60 s; measured after that"
    report["steps"][1]["ingest_calls_encoded_ahead"] = 0.75
    assert (
        table(report)
        .splitlines()[-1]
        .endswith("passes per call: 1.25, share of calls with their tower queued ahead: 0.75")
    )
    report["steps"][1]["ingest_calls_encoded_ahead"] = None
    report["steps"][0]["settled_after_s"] = 12.4
    assert "N=8: every lag under 2 s 12 s after the warm-up; measured after that" in table(report).splitlines()
    report["steps"][1]["allocator_events"] = {"retries": 2, "device_mallocs": 5}
    assert table(report).splitlines()[-1] == (
        "N=16: the GPU allocator during the step: retries 2, device_mallocs 5 (a retry gave back the cache and waited "
        "for the GPU)"
    )
    report["steps"][1]["kernel_compiles"] = 3
    assert table(report).splitlines()[-1] == (
        "N=16: Triton kernel variants compiled during the step: 3 (each held the engine thread; the warm-up missed "
        "them)"
    )
    report["steps"][1]["worker_gil"] = {"mean_late_ms": 0.734, "share_over_1ms": 0.25, "max_late_ms_so_far": 4.9}
    assert table(report).splitlines()[-1] == (
        "N=16: the worker's GIL: a 2-ms sleep woke 0.73 ms late on average, 25% of them over 1 ms late"
    )
    report["steps"][1].update(start_wait_p50_ms=12.4, start_wait_p99_ms=61.0, engine_ttft_p50_ms=15.2,
                              engine_ttft_p99_ms=18.9)  # fmt: skip
    assert table(report).splitlines()[-1] == (
        "N=16: the server's TTFT p50 / p99 30 / 80 ms; of a question's, waiting on the worker for the engine 12 / "
        "61 ms, the engine's prefill to first token 15 / 19 ms (each its own percentiles)"
    )
    report["steps"][1].update(handoff_p50_ms=0.42, handoff_p99_ms=5.1, transport_p50_ms=3.31, transport_p99_ms=40.0)
    assert table(report).splitlines()[-1] == (
        "N=16: outside the engine thread, the first token from the engine thread to the thread sending it 0.4 / "
        "5.1 ms, between router and worker both ways 3.3 / 40.0 ms (p50 / p99)"
    )


def test_engine_thread_share_and_call_sizes_come_from_two_scrapes():
    from services.bench_service_metrics import engine_thread, engine_totals

    def scrape(ingest_s: float, questions_s: float, frames: float, calls: float, passes: float) -> str:
        return "\n".join([
            f'mosaic_device_allocator_events_total{{worker="0",event="retries"}} {passes // 2}',
            f'mosaic_engine_loop_seconds_total{{worker="0",part="ingest"}} {ingest_s}',
            f'mosaic_engine_loop_seconds_total{{worker="1",part="ingest"}} {ingest_s}',
            f'mosaic_engine_loop_seconds_total{{worker="0",part="questions"}} {questions_s}',
            f'mosaic_ingest_batch_frames_sum{{worker="0"}} {frames}',
            f'mosaic_ingest_batch_frames_count{{worker="0"}} {calls}',
            f'mosaic_ingest_forward_passes_total{{worker="0"}} {passes}',
            f'mosaic_ingest_calls_encoded_ahead_total{{worker="0"}} {calls - 1}',
            f'mosaic_kernel_compiles_total{{worker="0"}} {calls // 2}',
            'mosaic_frames_ingested_total{stream="cam"} 12.0',
        ])  # fmt: skip

    before, after = engine_totals(scrape(1.0, 2.0, 64, 2, 4)), engine_totals(scrape(4.0, 3.0, 320, 6, 10))
    thread = engine_thread(before, after, elapsed_s=10.0)
    assert thread.share == pytest.approx({"ingest": 0.6, "questions": 0.1})  # two workers' ingest seconds add up
    assert (thread.frames_per_call, thread.passes_per_call, thread.encoded_ahead_share) == (64.0, 1.5, 1.0)
    assert thread.allocator_events == {"retries": 3}  # counts in the span, not a time share
    assert thread.kernel_compiles == 2
    idle = engine_thread(before, before, elapsed_s=10.0)
    assert (idle.frames_per_call, idle.passes_per_call, idle.encoded_ahead_share) == (None, None, None)
    assert idle.kernel_compiles == 0


def test_a_step_whose_metrics_were_never_read_reports_no_engine_thread_figures():
    from services.bench_service_metrics import engine_thread_between

    unread = engine_thread_between([], elapsed_s=10.0)
    assert unread.share == {} and unread.allocator_events == {} and unread.kernel_compiles == 0
    assert (unread.frames_per_call, unread.passes_per_call, unread.encoded_ahead_share) == (None, None, None)


def test_durable_rates_come_from_two_scrapes_summed_over_workers():
    from services.bench_service_metrics import durable_rates, durable_totals

    def scrape(written: float, write_s: float, wait_s: float) -> str:
        return "\n".join(
            f'{name}{{worker="{w}"}} {value}'
            for w in ("0", "1")
            for name, value in (
                ("mosaic_durable_bytes_written_total", written),
                ("mosaic_durable_write_seconds_total", write_s),
                ("mosaic_durable_ingest_wait_seconds_total", wait_s),
            )
        )

    rates = durable_rates(durable_totals(scrape(1e9, 2.0, 0.5)), durable_totals(scrape(6e9, 12.0, 1.5)), elapsed_s=10.0)
    assert rates == pytest.approx({"written_mb_per_s": 1000.0, "writers_busy_s_per_s": 2.0, "ingest_wait_s_per_s": 0.2})


def test_tier_summary_reads_each_tiers_use_and_the_bytes_moved_from_the_service_metrics():
    from services.bench_service_metrics import tier_summary, tier_totals
    from services.metrics import MosaicMetrics

    metrics = MosaicMetrics()
    for worker in (0, 1):
        metrics.memory.set_tier(worker, "device", 3 * GIB, 4 * GIB, 10)
        metrics.memory.set_tier(worker, "host", GIB, 8 * GIB, 5)
        metrics.memory.set_tier(worker, "disk", 0, 2**62, 0)  # the durable history's disk tier without a budget
        metrics.memory.add_transfer_bytes(worker, "device_to_host", 10**8)
    before = tier_totals(metrics.scrape())
    metrics.memory.set_tier(0, "device", 4 * GIB, 4 * GIB, 12)
    metrics.memory.add_transfer_bytes(1, "device_to_host", 5 * 10**8)
    metrics.memory.add_transfer_bytes(0, "host_to_device", 2 * 10**8)
    summary = tier_summary(before, tier_totals(metrics.scrape()), elapsed_s=10.0)
    assert summary["used_gib:device"] == pytest.approx(7.0)  # the step's end, summed over workers
    assert summary["capacity_gib:device"] == pytest.approx(8.0)
    assert summary["used_gib:host"] == pytest.approx(2.0)
    assert summary["device_to_host_mb_per_s"] == pytest.approx(50.0)
    assert summary["host_to_device_mb_per_s"] == pytest.approx(20.0)
    report = _report(_step(8), tiers=summary)
    assert any(
        line.startswith("N=8: KV held at the step's end: device 7.0 of 8.0 GiB") and "device_to_host 50, " in line
        for line in table(report).splitlines()
    ), table(report)


def test_stream_samples_read_lag_and_counters_per_camera_from_metrics_text():
    from services.bench_service_metrics import stream_samples

    text = "\n".join(
        [
            "# HELP mosaic_stream_lag_seconds How far ingest trails.",
            'mosaic_stream_lag_seconds{stream="push-001"} 0.75',
            'mosaic_stream_lag_seconds{stream="other-cam"} 9.0',
            'mosaic_frames_ingested_total{stream="push-001"} 12.0',
            'mosaic_frames_dropped_total{reason="queue_full",stream="push-001"} 2.0',
            'mosaic_frames_dropped_total{reason="decode_error",stream="push-001"} 1.0',
            'mosaic_frames_ingested_total{stream="pull-000"} 5.0',
            'mosaic_frames_received_total{stream="pull-000"} 7.0',
        ]
    )
    samples = stream_samples(text, {"push-001", "pull-000"})
    assert set(samples) == {"push-001", "pull-000"}
    assert (samples["push-001"].lag_s, samples["push-001"].frames_ingested, samples["push-001"].frames_dropped) == (
        0.75,
        12.0,
        3.0,
    )
    # no lag series: unknown, not 0
    assert (samples["pull-000"].lag_s, samples["pull-000"].frames_ingested, samples["pull-000"].frames_received) == (
        None,
        5.0,
        7.0,
    )


def test_written_results_name_no_folder_of_this_machine(tmp_path, monkeypatch):
    import json
    import tempfile

    from services.bench_service_report import without_local_paths

    monkeypatch.chdir(tmp_path)
    text = json.dumps({"roots": [str(tmp_path / ".gpu")], "log": f"see {tempfile.gettempdir()}/ray/session_1/logs"})
    scrubbed = without_local_paths(text)
    assert str(tmp_path) not in scrubbed and tempfile.gettempdir() + "/" not in scrubbed
    assert json.loads(scrubbed) == {"roots": ["<checkout>/.gpu"], "log": "see <tmp>/ray/session_1/logs"}


def test_start_gaps_reads_the_histogram_of_gaps_between_chances_to_start_a_question():
    from services.bench_service_metrics import start_gap_buckets, start_gaps

    def scrape(counts):  # cumulative bucket counts of pause_to_pause on two workers, per bound
        bounds = ("0.05", "0.1", "0.2", "+Inf")
        return "\n".join(
            f'mosaic_question_start_gap_seconds_bucket{{worker="{w}",between="pause_to_pause",le="{le}"}} {n / 2}'
            for w in ("0", "1")
            for le, n in zip(bounds, counts, strict=True)
        )

    before = start_gap_buckets(scrape((10, 10, 10, 10)))
    after = start_gap_buckets(scrape((60, 90, 109, 110)))  # 100 more: 50 under 50 ms, 30 more under 100, 19 under 200
    gaps = start_gaps(before, after)
    assert gaps == {
        "pause_to_pause": {"count": 100, "p50_under_ms": 50.0, "p99_under_ms": 200.0, "over_100ms": 20},
    }
    assert start_gaps(after, after) == {}  # nothing new: no entry
