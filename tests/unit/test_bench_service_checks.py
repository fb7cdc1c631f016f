"""The service benchmark's checks that keep a step's figures honest: the load that arrived, a backlog that grows, the
per-frame receipt-to-KV latency, the worst camera's lag, open-loop questions, and CPU and GPU memory of the worker."""

from __future__ import annotations

import os
import threading
import time

import pytest

from services.bench_service_load import (
    Load,
    PushCounts,
    Question,
    next_tick,
    push_delta,
    questions_in,
)
from services.bench_service_metrics import backlog_growth, histogram_buckets, histogram_quantile
from services.bench_service_window import Scrapes, camera_figures
from services.metrics import MosaicMetrics
from tests.unit.test_bench_service import _report, _step


def _failed(step) -> str:
    return "; ".join(step.failures)


# --- the rule --------------------------------------------------------------------------------------------------------


def test_a_step_whose_frames_did_not_all_arrive_is_load_short():
    # 8 cameras x 30 s: 240 nominal, 12 frames of window edge: 225.6 frames must arrive
    assert _step(received_fps=226 / 30).real_time
    short = _step(received_fps=225 / 30)
    assert not short.real_time and "load short (225 of 240 frames received)" in _failed(short)
    assert "load short" in _failed(_step(received_fps=None))  # not read: cannot pass


def test_a_backlog_that_grows_more_than_a_call_and_2_percent_of_the_frames_is_falling_behind():
    # one call of 128 frames + 2% of 240 nominal frames = 132.8
    assert _step(backlog_growth_frames=132.0).real_time
    behind = _step(backlog_growth_frames=140.0)
    assert not behind.real_time and "falling behind (backlog +140 frames, limit +133)" in _failed(behind)
    assert "falling behind" in _failed(_step(backlog_growth_frames=None))


def test_the_worst_cameras_lag_and_a_camera_without_lag_fail_the_step():
    assert not _step(worst_camera_lag_p99_s=2.4).real_time  # pooled p99 0.5 s hides one camera's 2.4 s
    assert "worst camera's lag p99 2.40 s" in _failed(_step(worst_camera_lag_p99_s=2.4))
    unknown = _step(lag_unknown_cameras=["pull-003"], worst_camera_lag_p99_s=None)
    assert not unknown.real_time and "lag unknown for 1 cameras" in _failed(unknown)


@pytest.mark.parametrize(
    ("changes", "real_time"),
    [({"questions_sent": 28}, True), ({"questions_sent": 27, "questions_not_sent": 3}, False),
     ({"questions_unfinished": 1}, False), ({"question_errors": {"DEADLINE_EXCEEDED": 1}}, False),
     ({"questions_nominal": 0.0, "questions_sent": 0}, True)],
)  # fmt: skip
def test_questions_must_be_sent_at_the_set_rate_and_every_one_finish(changes, real_time):
    # 30 nominal: 95% less one question of window edge is 27.5
    assert _step(**changes).real_time is real_time


# --- the figures from /metrics ---------------------------------------------------------------------------------------


def test_backlog_growth_is_the_trend_not_the_saw_tooth_of_ingest_calls():
    times = [float(t) for t in range(11)]
    saw = [0, 30, 60, 0, 30, 60, 0, 30, 60, 0, 30]  # calls of 90 frames, no trend... at the edges 0 then 30
    assert abs(backlog_growth(times, saw)) < 20  # the edges' difference says +30
    growing = [5.0 * t for t in times]
    assert backlog_growth(times, growing) == pytest.approx(50.0)
    assert backlog_growth([1.0], [3.0]) is None


def test_ingest_latency_percentiles_come_from_the_histograms_change_interpolated_within_buckets():
    metrics = MosaicMetrics()
    for _ in range(50):
        metrics.observe_ingest_latency(0, 0.01)  # before the window: not counted
    before = histogram_buckets(metrics.scrape(), "mosaic_ingest_latency_seconds")
    for worker, n in ((0, 60), (1, 40)):  # 100 in the window, all in the bucket (1.75, 2.0], two workers summed
        for _ in range(n):
            metrics.observe_ingest_latency(worker, 1.9)
    after = histogram_buckets(metrics.scrape(), "mosaic_ingest_latency_seconds")
    assert histogram_quantile(before, after, 0.5) == pytest.approx(1.875)  # halfway into (1.75, 2.0]
    assert histogram_quantile(before, after, 0.99) == pytest.approx(1.75 + 0.25 * 0.99)
    assert histogram_quantile(after, after, 0.5) is None  # nothing new
    metrics.observe_ingest_latency(0, 100.0)  # over every finite bound: reads as the largest, 30 s
    beyond = histogram_buckets(metrics.scrape(), "mosaic_ingest_latency_seconds")
    assert histogram_quantile(after, beyond, 0.99) == 30.0


def _scrapes(metrics: MosaicMetrics, ids: set[str], steps) -> Scrapes:
    """A window of scrapes of ``metrics``, one a second; ``steps`` changes the metrics before each."""
    scrapes = Scrapes(ids)
    for t, change in enumerate(steps):
        change(metrics)
        scrapes.add(metrics.scrape(), float(t))
    return scrapes


def test_camera_figures_report_the_worst_cameras_own_p99_and_an_unknown_lag_as_unknown():
    metrics = MosaicMetrics()

    def second(m: MosaicMetrics, lag_b: float) -> None:
        m.streams.frame_received("cam-a", 1)
        m.streams.frame_received("cam-b", 1)
        m.streams.frames_ingested("cam-a", 1)
        m.streams.frames_ingested("cam-b", 1)
        m.streams.set_stream_lag("cam-a", 0.1)
        m.streams.set_stream_lag("cam-b", lag_b)
        m.streams.set_ingest_queue_depth("cam-a", 1)

    # after the window's first scrape, cam-b waits 2.5 s once in 11 seconds: its own p99 is 2.26 s, while pooled with
    # cam-a's the p99 is 1.996 s and would pass
    lags_b = [0.1] * 11 + [2.5]
    scrapes = _scrapes(metrics, {"cam-a", "cam-b"}, [lambda m, lag=lag: second(m, lag) for lag in lags_b])
    figures = camera_figures(scrapes, elapsed_s=11.0)
    assert figures["received_fps"] == pytest.approx(2.0) and figures["ingested_fps"] == pytest.approx(2.0)
    assert figures["lag_p99_s"] == pytest.approx(1.996) and figures["worst_camera_lag_p99_s"] == pytest.approx(2.26)
    assert figures["lag_unknown_cameras"] == [] and figures["backlog_growth_frames"] == pytest.approx(0.0)

    # cam-c has counters but never a lag series: unknown, where it used to read as 0
    scrapes = _scrapes(
        MosaicMetrics(), {"cam-a", "cam-c"}, [lambda m: (second(m, 0.1), m.streams.frame_received("cam-c"))] * 3
    )
    figures = camera_figures(scrapes, elapsed_s=2.0)
    assert figures["lag_unknown_cameras"] == ["cam-c"] and figures["worst_camera_lag_p99_s"] is None
    assert figures["lag_p99_s"] == pytest.approx(0.1)  # pooled over the cameras whose lag is known


def test_a_camera_without_a_lag_series_does_not_let_the_step_settle():
    from services.bench_service import lags_settled
    from services.bench_service_metrics import stream_samples

    metrics = MosaicMetrics()
    metrics.streams.set_stream_lag("cam-a", 0.2)
    metrics.streams.frame_received("cam-b")
    assert not lags_settled(stream_samples(metrics.scrape(), {"cam-a", "cam-b"}), {"cam-a", "cam-b"})
    metrics.streams.set_stream_lag("cam-b", 0.4)
    assert lags_settled(stream_samples(metrics.scrape(), {"cam-a", "cam-b"}), {"cam-a", "cam-b"})
    metrics.streams.set_stream_lag("cam-b", 2.0)
    assert not lags_settled(stream_samples(metrics.scrape(), {"cam-a", "cam-b"}), {"cam-a", "cam-b"})


# --- the load --------------------------------------------------------------------------------------------------------


def test_a_pusher_that_wakes_late_sends_the_latest_frame_and_counts_those_it_skipped():
    assert next_tick(4, start_s=0.0, now_s=5.01, fps=1.0) == (5, 0)  # on time
    assert next_tick(4, start_s=0.0, now_s=8.3, fps=1.0) == (8, 3)  # frames 5, 6 and 7 fell due during a call
    assert next_tick(10, start_s=0.0, now_s=2.6, fps=2.0) == (11, 0)  # early wake-ups still move on by one
    before = [PushCounts(sent=10, skipped=1), PushCounts(sent=4)]
    after = [PushCounts(sent=16, skipped=4, refused=1), PushCounts(sent=10, dropped=2)]
    assert push_delta(before, after) == [PushCounts(6, 3, 1, 0), PushCounts(6, 0, 0, 2)]


def test_questions_belong_to_the_window_they_were_sent_in_and_unfinished_ones_count():
    answered = Question(due_s=1.0, sent_s=1.0, finished_s=2.0)
    running = Question(due_s=9.0, sent_s=9.0)  # sent near the end, still running: the window's, unfinished
    failed = Question(due_s=5.0, sent_s=5.0, finished_s=5.5, error="UNAVAILABLE")
    not_sent = Question(due_s=6.0)
    earlier = Question(due_s=-0.5, sent_s=-0.5, finished_s=1.5)  # finished in the window, sent before it
    window = questions_in([answered, running, failed, not_sent, earlier], 0.0, 10.0)
    assert window.sent == [answered, running, failed]
    assert (window.not_sent, window.unfinished, dict(window.errors)) == (1, 1, {"UNAVAILABLE": 1})


class _SlowAnswers:
    """A stand-in for ``LocalService.client()`` (the only fake here: the pacing of questions needs no service) whose
    answers take ``answer_s``; its events are real ``QueryEvent`` messages."""

    def __init__(self, answer_s: float) -> None:
        self.answer_s = answer_s

    def client(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def query(self, question, stream_ids, **kwargs):
        from services.gen.mosaic.v1 import mosaic_pb2 as pb

        time.sleep(self.answer_s)
        yield pb.QueryEvent(token=pb.TokenChunk(token_ids=[1]))


def test_questions_fall_due_at_the_set_rate_whatever_the_answers_and_overflow_is_counted_as_not_sent():
    load = Load(_SlowAnswers(answer_s=0.45), jpegs=[], fps=1.0, questions_per_s=10.0, max_new_tokens=1,
                push_clients=0, question_clients=2)  # fmt: skip
    load.cameras.append("cam")
    load.start()
    started = time.monotonic()
    time.sleep(1.0)
    window = load.window(started, started + 1.0, wait_s=2.0)
    load.stop()
    # about ten fell due in the second: two clients answering for 0.45 s each take four or five
    assert 9 <= len(window.sent) + window.not_sent <= 11, window
    assert 3 <= len(window.sent) <= 6 and window.not_sent >= 4, window
    assert window.unfinished == 0 and len(window.answers) == len(window.sent)
    assert threading.active_count() < 50


# --- the worker's processes ------------------------------------------------------------------------------------------


def test_tree_cpu_counts_the_decoding_child_processes_that_the_process_alone_misses():
    from mosaic_core.model.video import sample_clip_path
    from services.bench_service_procs import cpu_seconds, tree_cpu
    from services.source_decoding import iter_frames_in_child

    me = os.getpid()
    before, alone_before = tree_cpu(me), cpu_seconds(me)
    frames = iter_frames_in_child(sample_clip_path("bikes.mp4"), fps=25.0, loop=True, start_offset_s=0.0)
    for _, _ in zip(range(40), frames, strict=False):  # a real decode child, 40 frames
        pass
    during = tree_cpu(me)
    frames.close()
    decode_s = during.decode_s - before.decode_s
    assert len(during.pids) > len(before.pids) and decode_s > 0.05, (before, during)
    assert during.total_s - before.total_s >= decode_s
    # the process alone spent far less than its child decoded: the figure before this check
    assert cpu_seconds(me) - alone_before < during.total_s - before.total_s


def test_gpu_memory_is_the_worker_processes_not_every_gpu():
    from services.bench_service_procs import compute_apps_mib

    apps = "4242, 30000\n999, 70000\n4250, 1200\n"  # another process on another GPU holds 70000 MiB
    assert compute_apps_mib(apps, {4242, 4250}) == 31200.0
    assert compute_apps_mib(apps, {7}) is None
    assert compute_apps_mib("", {4242}) is None


# --- the report ------------------------------------------------------------------------------------------------------


def test_the_report_prints_the_settings_and_the_new_columns():
    from services.bench_service import main_args, run_settings
    from services.bench_service_report import table

    settings = run_settings(main_args(["--quick"]))
    assert (settings["retention_s"], settings["max_new_tokens"], settings["questions_per_s"]) == (20.0, 4, 0.5)
    assert (settings["max_batch_frames"], settings["measure_s"], settings["warmup_s"]) == (128, 6.0, 4.0)
    report = _report(_step(8, tiers={"used_gib:device": 1.5}), _step(16, received_fps=10.0))
    report["settings"] = settings
    lines = table(report).splitlines()
    header = lines[0]
    for column in ("received/s", "backlog +", "worst cam p99 s", "to-KV p50 s", "to-KV p99 s", "push skipped",
                   "KV dev GiB", "decode cpu/s est"):  # fmt: skip
        assert column in header, header
    assert lines[1].split()[header.split().index("N") :][:1] == ["8"] and " 1.5 " in lines[1]
    assert "retention 20.0 s, 4 tokens per answer, questions 1/s open-loop" in table(report)
    assert "measure 6 s" in table(report)
    assert "N=16: not real-time: load short (300 of 480 frames received)" in table(report)
    assert report["steps"][1]["failures"] and not report["steps"][1]["real_time"]
