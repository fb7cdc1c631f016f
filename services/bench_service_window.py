"""One measurement window of ``mosaic bench service``: the /metrics scrapes taken in it, and the step's figures from
them, the pushers' counts and the questions (no service: ``bench_service.measure_step`` does the reading)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from services.bench_service_load import Answer, PushCounts, QuestionWindow
from services.bench_service_metrics import (
    StreamSample,
    backlog_growth,
    counter_delta,
    durable_rates,
    durable_totals,
    engine_thread_between,
    engine_totals,
    histogram_buckets,
    histogram_quantile,
    lag_by_camera,
    start_gap_buckets,
    start_gaps,
    stream_samples,
    tier_summary,
    tier_totals,
    total_queue_depth,
)
from services.bench_service_procs import TreeCpu

INGEST_LATENCY = "mosaic_ingest_latency_seconds"


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else 1e3 * value


@dataclass(slots=True)
class Scrapes:
    """What each /metrics scrape of a window read, in order, with its ``time.monotonic()``."""

    ids: set[str]
    times_s: list[float] = field(default_factory=list)
    streams: list[dict[str, StreamSample]] = field(default_factory=list)
    engine: list[dict[str, float]] = field(default_factory=list)
    durable: list[dict[str, float]] = field(default_factory=list)
    tiers: list[dict[str, float]] = field(default_factory=list)
    gaps: list[dict[tuple[str, float], float]] = field(default_factory=list)
    ingest_latency: list[dict[float, float]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def add(self, text: str | None, at_s: float) -> None:
        """One scrape's text; empty or None: the service did not answer (counted, and a step that cannot pass)."""
        if not text:
            self.errors["METRICS_UNREADABLE"] += 1
            return
        self.times_s.append(at_s)
        self.streams.append(stream_samples(text, self.ids))
        self.engine.append(engine_totals(text))
        self.durable.append(durable_totals(text))
        self.tiers.append(tier_totals(text))
        self.gaps.append(start_gap_buckets(text))
        self.ingest_latency.append(histogram_buckets(text, INGEST_LATENCY))


def camera_figures(scrapes: Scrapes, elapsed_s: float) -> dict:
    """The cameras' figures of the window: frames received and ingested per second, drops, lag pooled and per camera,
    the ingest backlog's growth, and the per-frame receipt-to-KV latency's percentiles."""
    streams = scrapes.streams
    before, after = (streams[0], streams[-1]) if streams else ({}, {})
    # The first scrape opens the window: lags are those of the seconds after it, as the counters' deltas are.
    lags = lag_by_camera(streams[1:], scrapes.ids) if len(streams) > 1 else dict.fromkeys(scrapes.ids)
    pooled = [lag for per_camera in lags.values() if per_camera for lag in per_camera]
    unknown = sorted(camera for camera, per_camera in lags.items() if not per_camera)
    worst = None if unknown else max((percentile(v, 99) for v in lags.values() if v), default=None)
    latency = (scrapes.ingest_latency[0], scrapes.ingest_latency[-1]) if scrapes.ingest_latency else ({}, {})
    return {
        "received_fps": counter_delta(before, after, "frames_received") / elapsed_s if streams else None,
        "ingested_fps": counter_delta(before, after, "frames_ingested") / elapsed_s,
        "dropped_in_metrics": counter_delta(before, after, "frames_dropped"),
        "lag_p50_s": percentile(pooled, 50),
        "lag_p99_s": percentile(pooled, 99),
        "lag_max_s": max(pooled, default=None),
        "worst_camera_lag_p99_s": worst,
        "lag_unknown_cameras": unknown,
        "backlog_growth_frames": backlog_growth(scrapes.times_s, [total_queue_depth(s) for s in streams]),
        "ingest_latency_p50_s": histogram_quantile(*latency, 0.5),
        "ingest_latency_p99_s": histogram_quantile(*latency, 0.99),
    }


def engine_figures(scrapes: Scrapes, elapsed_s: float) -> dict:
    """The workers' engine thread, record writing, tiers and gaps between chances to start a question."""
    thread = engine_thread_between(scrapes.engine, elapsed_s)
    return {
        "engine_thread_share": thread.share,
        "frames_per_ingest_call": thread.frames_per_call,
        "forward_passes_per_ingest_call": thread.passes_per_call,
        "ingest_calls_encoded_ahead": thread.encoded_ahead_share,
        "allocator_events": thread.allocator_events,
        "kernel_compiles": thread.kernel_compiles,
        "durable": durable_rates(scrapes.durable[0], scrapes.durable[-1], elapsed_s) if scrapes.durable else None,
        "tiers": tier_summary(scrapes.tiers[0], scrapes.tiers[-1], elapsed_s) if scrapes.tiers else None,
        "question_start_gaps": start_gaps(scrapes.gaps[0], scrapes.gaps[-1]) if scrapes.gaps else {},
    }


def cpu_figures(
    before: tuple[float | None, TreeCpu | None],
    after: tuple[float | None, TreeCpu | None],
    elapsed_s: float,
    *,
    pulled: int,
    decode_in_threads: bool,
) -> dict:
    """CPU seconds a second in the window, from (router process, worker process tree) readings at its ends: the
    router's, the worker tree's, and its decoding processes' where pulled cameras decode in processes of their own."""
    router_cpu = None if None in (before[0], after[0]) else (after[0] - before[0]) / elapsed_s
    worker_cpu = decode_cpu = None
    if before[1] is not None and after[1] is not None:
        worker_cpu = (after[1].total_s - before[1].total_s) / elapsed_s
        if len(after[1].pids) > 1 and pulled and not decode_in_threads:
            decode_cpu = (after[1].decode_s - before[1].decode_s) / elapsed_s
    return {"router_cpu_per_s": router_cpu, "worker_cpu_per_s": worker_cpu, "decode_cpu_per_s": decode_cpu}


def decode_cpu_estimate(decode_cost_s: dict, *, fps: float, num_cameras: int, pulled: int) -> float | None:
    """CPU seconds a second that decoding every camera's frames should take, from the measured cost of one frame:
    a JPEG for each pushed camera, a video frame for each pulled one; None without a JPEG cost."""
    if decode_cost_s.get("jpeg_s") is None:
        return None
    estimate = fps * ((num_cameras - pulled) * decode_cost_s["jpeg_s"])
    estimate += fps * pulled * (decode_cost_s.get("video_s") or 0.0)
    return estimate


def gpu_figures(samples: list[tuple[float | None, str | None]]) -> dict:
    """The most GPU memory the worker held in the window's samples, and where the first figure came from."""
    seen = [g for g in samples if g[0] is not None]
    return {
        "gpu_memory_used_mib": max((g[0] for g in seen), default=None),
        "gpu_memory_source": seen[0][1] if seen else None,
    }


def push_figures(pushes: list[PushCounts]) -> dict:
    """The pushers' counts in the window, in all and per client."""
    return {
        "push_sent": sum(p.sent for p in pushes),
        "push_skipped": sum(p.skipped for p in pushes),
        "refused": sum(p.refused for p in pushes),
        "push_by_client": [{"sent": p.sent, "skipped": p.skipped} for p in pushes],
    }


def question_figures(questions: QuestionWindow, questions_per_s: float, elapsed_s: float) -> dict:
    """The questions sent in the window: how many of the nominal, answered, failed and unfinished, and the answered
    ones' time to first token and decode as the client saw them and as the server reported them."""
    answers = questions.answers

    def p(values: list[float | None], q: float) -> float | None:
        return ms(percentile([v for v in values if v is not None], q))

    def median(values: list[float | None]) -> float | None:
        seen = [v for v in values if v is not None]
        return ms(statistics.median(seen)) if seen else None

    figures = {
        "questions_nominal": questions_per_s * elapsed_s,
        "questions_sent": len(questions.sent),
        "questions_not_sent": questions.not_sent,
        "questions_unfinished": questions.unfinished,
        "questions": len(answers),
        "question_errors": dict(questions.errors),
        "decode_ms_per_token": median([a.decode_s_per_token for a in answers]),
        "server_decode_ms_per_token": median([a.server_decode_s_per_token for a in answers]),
        "ttft_samples_ms": [question_sample_ms(a) for a in answers],
    }
    for name, values in (
        ("ttft", [a.ttft_s for a in answers]),
        ("server_ttft", [a.server_ttft_s for a in answers]),
        ("start_wait", [a.start_wait_s for a in answers]),
        ("engine_ttft", [a.engine_ttft_s for a in answers]),
        ("handoff", [a.handoff_s for a in answers]),
        ("transport", [a.transport_s for a in answers]),
    ):
        figures[f"{name}_p50_ms"], figures[f"{name}_p99_ms"] = p(values, 50), p(values, 99)
    return figures


def question_sample_ms(answer: Answer) -> dict[str, float | None]:
    """One answered question's time to first token and its parts, in ms (the step's p99 of a few dozen questions is
    nearly their maximum, so the JSON keeps every one)."""
    return {
        "client": ms(answer.ttft_s),
        "server": ms(answer.server_ttft_s),
        "start_wait": ms(answer.start_wait_s),
        "engine": ms(answer.engine_ttft_s),
        "worker": ms(answer.worker_ttft_s),
        "handoff": ms(answer.handoff_s),
        "transport": ms(answer.transport_s),
    }
