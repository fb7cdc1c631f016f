"""What ``mosaic bench service`` reads from the service's /metrics text: per-camera samples, the workers' totals, and
the figures of a measurement window computed from two or more scrapes (pure functions, no service)."""

from __future__ import annotations

import re
from dataclasses import dataclass

METRIC_LINE = re.compile(r"^(mosaic_\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)
STREAM_LABEL = re.compile(r'stream="([^"]*)"')
PART_LABEL = re.compile(r'part="([^"]*)"')
BATCH_FRAMES = ("mosaic_ingest_batch_frames_sum", "mosaic_ingest_batch_frames_count")
FORWARD_PASSES = "mosaic_ingest_forward_passes_total"
ENCODED_AHEAD = "mosaic_ingest_calls_encoded_ahead_total"


@dataclass(slots=True)
class StreamSample:
    """One camera in one scrape; None where the service had no such series (unknown, not zero)."""

    lag_s: float | None = None
    queue_depth: float | None = None
    frames_received: float = 0.0
    frames_ingested: float = 0.0
    frames_dropped: float = 0.0


def stream_samples(metrics_text: str, ids: set[str]) -> dict[str, StreamSample]:
    """Each camera's lag, ingest queue depth and frame counters from the service's /metrics text (every reason of
    drop summed)."""
    samples: dict[str, StreamSample] = {}
    for name, labels, value in METRIC_LINE.findall(metrics_text):
        stream = STREAM_LABEL.search(labels)
        if stream is None or stream.group(1) not in ids:
            continue
        sample = samples.setdefault(stream.group(1), StreamSample())
        if name == "mosaic_stream_lag_seconds":
            sample.lag_s = float(value)
        elif name == "mosaic_ingest_queue_depth":
            sample.queue_depth = float(value)
        elif name == "mosaic_frames_received_total":
            sample.frames_received = float(value)
        elif name == "mosaic_frames_ingested_total":
            sample.frames_ingested = float(value)
        elif name == "mosaic_frames_dropped_total":
            sample.frames_dropped += float(value)
    return samples


def counter_delta(before: dict[str, StreamSample], after: dict[str, StreamSample], field: str) -> float:
    """A per-camera counter (``frames_received`` and so on) between two scrapes, summed over the cameras of ``after``;
    a camera missing from ``before`` counts from its value in ``after`` (none of its frames are counted)."""
    return sum(getattr(s, field) - getattr(before.get(c, s), field) for c, s in after.items())


def lag_by_camera(samples: list[dict[str, StreamSample]], ids: set[str]) -> dict[str, list[float] | None]:
    """Every camera's lag in each scrape; None for a camera that lacked a lag series in any scrape (its lag then is
    unknown: reading it as 0 would pass a camera the service stopped reporting)."""
    lags: dict[str, list[float] | None] = {c: [] for c in ids}
    for sample in samples:
        for camera in ids:
            seen = sample.get(camera)
            if seen is None or seen.lag_s is None:
                lags[camera] = None
            elif lags[camera] is not None:
                lags[camera].append(seen.lag_s)
    return lags


def total_queue_depth(sample: dict[str, StreamSample]) -> float:
    """Frames waiting for ingest in one scrape, summed over its cameras (a camera without the gauge adds none)."""
    return sum(s.queue_depth or 0.0 for s in sample.values())


def backlog_growth(times_s: list[float], depths: list[float]) -> float | None:
    """How much the ingest backlog grew over the samples, in frames: the least-squares slope of depth over time times
    the span. An ingest call takes up to a batch of frames out of the queues at once, so the depth saw-tooths by up
    to one call between scrapes; a slope over every scrape is less at the mercy of where in that cycle the first and
    last scrapes fell than their difference. None with fewer than two samples."""
    if len(times_s) < 2:
        return None
    mean_t, mean_d = sum(times_s) / len(times_s), sum(depths) / len(depths)
    spread = sum((t - mean_t) ** 2 for t in times_s)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (d - mean_d) for t, d in zip(times_s, depths, strict=True)) / spread
    return slope * (times_s[-1] - times_s[0])


LE_LABEL = re.compile(r'le="([^"]*)"')


def histogram_buckets(metrics_text: str, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (``+Inf`` as ``inf``), summed over every other label."""
    counts: dict[float, float] = {}
    for metric, labels, value in METRIC_LINE.findall(metrics_text):
        if metric == f"{name}_bucket" and (le := LE_LABEL.search(labels)):
            bound = float(le.group(1))  # float("+Inf") is inf
            counts[bound] = counts.get(bound, 0.0) + float(value)
    return counts


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of the observations between two scrapes of a histogram, as Prometheus's
    ``histogram_quantile`` computes it: linear within the bucket that holds it, from 0 for the first bucket; one in the
    ``+Inf`` bucket reads as the largest finite bound (a lower bound, then). None with no observation."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    if not bounds or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank and count > below:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


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
