"""Worker-side counters drained by the router into its ``MosaicMetrics`` (one /metrics endpoint per service).

Workers are separate processes, so they cannot share the router's Prometheus registry. Each worker counts
into a ``WorkerTelemetry``; the router calls the worker's ``drain_telemetry`` every
``telemetry_interval_s`` and gets a ``TelemetryDelta``: counter increments and histogram observations
since the previous drain, plus current gauge values. Drain semantics make a worker restart harmless for the
per-stream counters and the worker's durability counters: the new process starts from zero and the router keeps
adding deltas, so they stay monotonic. The worker's other series (ingest histograms, forward passes, transfers,
allocator events, kernel compiles, engine-loop seconds) go while it misses a poll (``MosaicMetrics.forget_worker``)
and start again from 0 when it answers, which Prometheus reads as a counter reset. The per-stream totals that
GetStream reports are saved with the stream's durable state and restored with it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field

from services.memory_metrics import ALLOCATOR_EVENTS, HOST_CHUNK_HOWS, TRANSFER_DIRECTIONS
from services.metrics import MosaicMetrics

MAX_BUFFERED_OBSERVATIONS = 10_000  # per drain interval; beyond it the oldest observations are skipped
FORGOTTEN_FOR_S = 60.0  # a deleted stream's frames still on their way (a source thread's last) go uncounted this long


@dataclass(slots=True)
class StreamTotals:
    received: int = 0
    ingested: int = 0
    dropped: int = 0


@dataclass(slots=True)
class TierGauges:
    used_bytes: int
    capacity_bytes: int
    num_clusters: int


@dataclass(slots=True)
class DurabilityHealth:
    """A worker's durable writer and metadata publisher: gauges, and counter increments since the last drain."""

    pid: int = 0
    store_up: bool = True
    queue_depth: int = 0
    writes_dropped: int = 0
    resyncs: int = 0
    pending_clusters: int = 0
    oldest_pending_s: float = 0.0
    clusters_written: int = 0
    write_errors: int = 0
    bytes_written: int = 0
    write_s: float = 0.0  # the record writers' time on files, summed over threads
    ingest_wait_s: float = 0.0  # the engine thread's time waiting for the writers to make room
    writers: int = 0  # the record writer threads (0 without a data directory)
    history_bytes: int = 0  # the records of sealed clusters the engine keeps (KV and keyframes)
    history_budget_bytes: int = 0  # 0: no limit
    clusters_dropped_for_space: int = 0  # to keep history_budget_bytes
    streams_set_aside: int = 0  # streams a restart could not restore, moved under .unreadable (durable.checks)
    clusters_set_aside: int = 0  # records whose summary a restart could not read, moved there
    # streams found at the start and left on disk under their ids, not served, by reason (a gauge: UNSERVED_REASONS)
    streams_unserved: dict[str, int] = field(default_factory=dict)
    restore_s: float = 0.0  # how long this worker process's start took to restore its streams (a gauge)
    streams_restored: int = 0  # the streams it restored then (a gauge)

    def increments_since(self, seen: DurabilityHealth) -> DurabilityHealth:
        """The same gauges, with each counter replaced by its growth since ``seen``."""
        counters = (
            "writes_dropped", "resyncs", "clusters_written", "write_errors", "bytes_written", "write_s",
            "ingest_wait_s", "clusters_dropped_for_space", "streams_set_aside", "clusters_set_aside",
        )  # fmt: skip
        return dataclasses.replace(self, **{c: getattr(self, c) - getattr(seen, c) for c in counters})


def durability_health(
    pid: int,
    published,
    durable,
    history=None,
    history_budget_bytes: int = 0,
    *,
    restore_s: float = 0.0,
    streams_restored: int = 0,
) -> DurabilityHealth:
    """A worker's totals from its ``PublisherStats``, ``DurableStats`` and ``HistoryKeeper`` (None without a data
    directory), and what its start restored, in how long."""
    return DurabilityHealth(
        pid=pid,
        store_up=published.store_up,
        queue_depth=published.queue_depth,
        writes_dropped=published.writes_dropped,
        resyncs=published.resyncs,
        pending_clusters=durable.pending_clusters if durable else 0,
        oldest_pending_s=durable.oldest_pending_s if durable else 0.0,
        clusters_written=durable.clusters_written if durable else 0,
        write_errors=durable.write_errors if durable else 0,
        bytes_written=durable.bytes_written if durable else 0,
        write_s=durable.file_write_s if durable else 0.0,
        ingest_wait_s=durable.submit_wait_s + durable.staging_wait_s if durable else 0.0,
        writers=durable.writers if durable else 0,
        history_bytes=history.ledger.total_bytes if history else 0,
        history_budget_bytes=history_budget_bytes,
        clusters_dropped_for_space=history.dropped_for_space if history else 0,
        streams_set_aside=durable.streams_set_aside if durable else 0,
        clusters_set_aside=durable.clusters_set_aside if durable else 0,
        streams_unserved=dict(durable.streams_left) if durable else {},
        restore_s=restore_s,
        streams_restored=streams_restored,
    )


@dataclass(slots=True)
class TelemetryDelta:
    """What changed on one worker since the previous drain."""

    worker_id: str
    pid: int = 0  # the worker's process: another one than the last drain's is a restart
    received: dict[str, int] = field(default_factory=dict)
    ingested: dict[str, int] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)
    ingest_latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    forward_passes: int = 0  # of the ingest calls in batch_sizes
    calls_encoded_ahead: int = 0  # of those calls, the ones whose tower was queued the call before
    queue_depths: dict[str, int] = field(default_factory=dict)
    lags_s: dict[str, float] = field(default_factory=dict)
    tiers: dict[str, TierGauges] = field(default_factory=dict)
    transfer_bytes: dict[str, int] = field(default_factory=dict)
    allocator_events: dict[str, int] = field(default_factory=dict)  # increments, by ALLOCATOR_EVENTS
    kernel_compiles: int = 0  # increment of EngineStats.kernel_compiles
    host_chunks: dict[str, int] = field(default_factory=dict)  # increments, by HOST_CHUNK_HOWS
    host_grow_wait_s: float = 0.0  # increment of EngineStats.host_grow_wait_s
    host_pool_bytes: int | None = None  # EngineStats.host_pool_bytes at the drain (None: no stats yet)
    device_hit_ratio: float | None = None  # None: no engine stats yet
    durability: DurabilityHealth | None = None
    # Seconds the worker's engine thread has gone without a chance to start a question: it ingests, runs commands
    # and answers between such chances, so a stuck one (a hung GPU call, a deadlock) lets this grow without end.
    engine_stalled_s: float = 0.0
    sources_failing: int = 0  # pulled sources in ERROR at the drain
    loop_seconds: dict[str, float] = field(default_factory=dict)  # engine thread, by ENGINE_LOOP_PARTS
    question_start_gaps: list[tuple[str, float]] = field(default_factory=list)  # (QUESTION_START_GAPS label, s)
    answer_thread_waits_s: list[float] = field(default_factory=list)  # from an ask's sending to its thread taking it


class WorkerTelemetry:
    """Thread-safe accumulator on the worker (producers, engine loop and drain run on different threads)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._delta = TelemetryDelta(worker_id)
        self._transfer_seen: dict[str, int] = dict.fromkeys(TRANSFER_DIRECTIONS, 0)
        self._allocator_seen: dict[str, int] = dict.fromkeys(ALLOCATOR_EVENTS, 0)
        self._compiles_seen = 0
        self._host_chunks_seen: dict[str, int] = dict.fromkeys(HOST_CHUNK_HOWS, 0)
        self._host_grow_wait_seen = 0.0
        self._totals: dict[str, StreamTotals] = {}
        self._forgotten: dict[str, float] = {}  # deleted streams, by when (monotonic)

    def totals(self, stream_id: str) -> StreamTotals:
        """Frames received, ingested and dropped by the stream since it opened on this worker."""
        with self._lock:
            t = self._totals.get(stream_id) or StreamTotals()
            return StreamTotals(t.received, t.ingested, t.dropped)

    def restore(self, stream_id: str, totals: StreamTotals) -> None:
        """Continues a restored stream's totals from what its previous process saved."""
        with self._lock:
            self._forgotten.pop(stream_id, None)
            self._totals[stream_id] = StreamTotals(totals.received, totals.ingested, totals.dropped)

    def opened(self, stream_id: str) -> None:
        """A stream opened on this worker, perhaps under the id of one deleted in the last ``FORGOTTEN_FOR_S``: its
        frames count from now."""
        with self._lock:
            self._forgotten.pop(stream_id, None)

    def forget(self, stream_id: str) -> None:
        """A deleted stream: its totals go, and for ``FORGOTTEN_FOR_S`` its frames still on their way are not
        counted (they would bring its totals back, and its series with them)."""
        now = time.monotonic()
        with self._lock:
            self._totals.pop(stream_id, None)
            self._forgotten = {sid: at for sid, at in self._forgotten.items() if now - at < FORGOTTEN_FOR_S}
            self._forgotten[stream_id] = now

    def _total(self, stream_id: str) -> StreamTotals:
        return self._totals.setdefault(stream_id, StreamTotals())

    def received(self, stream_id: str, n: int = 1) -> None:
        with self._lock:
            if stream_id in self._forgotten:
                return
            self._delta.received[stream_id] = self._delta.received.get(stream_id, 0) + n
            self._total(stream_id).received += n

    def dropped(self, stream_id: str, reason: str, n: int = 1) -> None:
        with self._lock:
            if stream_id in self._forgotten:
                return
            key = (stream_id, reason)
            self._delta.dropped[key] = self._delta.dropped.get(key, 0) + n
            self._total(stream_id).dropped += n

    def ingested_batch(
        self, per_stream: dict[str, int], latencies_s: list[float], *, forward_passes: int, encoded_ahead: bool = False
    ) -> None:
        """One ingest call: its frames by stream, each frame's time from arrival to ingested, its forward passes, and
        whether its vision tower was queued the call before (``encode_ahead``)."""
        with self._lock:
            self._delta.forward_passes += forward_passes
            self._delta.calls_encoded_ahead += encoded_ahead
            for stream_id, n in per_stream.items():
                if stream_id in self._forgotten:
                    continue
                self._delta.ingested[stream_id] = self._delta.ingested.get(stream_id, 0) + n
                self._total(stream_id).ingested += n
            self._delta.batch_sizes.append(sum(per_stream.values()))
            self._delta.ingest_latencies_s.extend(latencies_s)
            del self._delta.ingest_latencies_s[:-MAX_BUFFERED_OBSERVATIONS]
            del self._delta.batch_sizes[:-MAX_BUFFERED_OBSERVATIONS]

    def spent(self, part: str, seconds: float) -> None:
        """The engine thread spent ``seconds`` on ``part`` (one of ``ENGINE_LOOP_PARTS``)."""
        with self._lock:
            self._delta.loop_seconds[part] = self._delta.loop_seconds.get(part, 0.0) + seconds

    def question_start_gap(self, between: str, seconds: float) -> None:
        """The engine thread had no chance to start a question for ``seconds``, between the chances ``between``
        names (``QUESTION_START_GAPS``)."""
        with self._lock:
            self._delta.question_start_gaps.append((between, seconds))
            del self._delta.question_start_gaps[:-MAX_BUFFERED_OBSERVATIONS]

    def answer_thread_wait(self, seconds: float) -> None:
        """An ask waited ``seconds`` from its sending to one of the worker's answer threads taking it."""
        with self._lock:
            self._delta.answer_thread_waits_s.append(seconds)
            del self._delta.answer_thread_waits_s[:-MAX_BUFFERED_OBSERVATIONS]

    def drain(self, *, queue_depths: dict[str, int], lags_s: dict[str, float], engine_stats) -> TelemetryDelta:
        """Returns the delta since the last drain and starts a new one; gauges come from the caller."""
        with self._lock:
            delta, self._delta = self._delta, TelemetryDelta(self.worker_id)
        delta.queue_depths = queue_depths
        delta.lags_s = lags_s
        delta.pid = os.getpid()
        if engine_stats is not None:
            delta.tiers = {
                tier: TierGauges(
                    used_bytes=engine_stats.used_bytes_by_tier[tier],
                    capacity_bytes=min(engine_stats.capacity_bytes_by_tier[tier], 1 << 62),
                    num_clusters=engine_stats.clusters_by_tier[tier],
                )
                for tier in engine_stats.used_bytes_by_tier
            }
            for direction in TRANSFER_DIRECTIONS:
                total = engine_stats.transfer_bytes_by_direction.get(direction, 0)
                delta.transfer_bytes[direction] = max(0, total - self._transfer_seen[direction])
                self._transfer_seen[direction] = total
            for event, total in engine_stats.allocator_events.items():
                delta.allocator_events[event] = max(0, total - self._allocator_seen[event])
                self._allocator_seen[event] = total
            if engine_stats.kernel_compiles is not None:
                delta.kernel_compiles = max(0, engine_stats.kernel_compiles - self._compiles_seen)
                self._compiles_seen = engine_stats.kernel_compiles
            self._host_growth(delta, engine_stats)
            delta.device_hit_ratio = engine_stats.device_hit_ratio
        return delta

    def _host_growth(self, delta: TelemetryDelta, engine_stats) -> None:
        totals = {"ahead": engine_stats.host_chunks_ahead, "sync": engine_stats.host_chunks_sync}
        for how, total in totals.items():
            delta.host_chunks[how] = max(0, total - self._host_chunks_seen[how])
            self._host_chunks_seen[how] = total
        delta.host_grow_wait_s = max(0.0, engine_stats.host_grow_wait_s - self._host_grow_wait_seen)
        self._host_grow_wait_seen = engine_stats.host_grow_wait_s
        delta.host_pool_bytes = engine_stats.host_pool_bytes


def apply_delta(metrics: MosaicMetrics, delta: TelemetryDelta, *, open_streams: set[str]) -> None:
    """Feeds one worker's delta into the router's metrics (router side).

    Streams deleted since the worker counted are skipped, so a deleted stream's label is not recreated.
    """
    worker = delta.worker_id
    for stream_id, n in delta.received.items():
        if stream_id in open_streams:
            metrics.streams.frame_received(stream_id, n)
    for stream_id, n in delta.ingested.items():
        if stream_id in open_streams:
            metrics.streams.frames_ingested(stream_id, n)
    for (stream_id, reason), n in delta.dropped.items():
        if stream_id in open_streams:
            metrics.streams.frame_dropped(stream_id, reason, n)
    for seconds in delta.ingest_latencies_s:
        metrics.observe_ingest_latency(worker, seconds)
    for n in delta.batch_sizes:
        metrics.observe_ingest_batch(worker, n)
    if delta.forward_passes:
        metrics.add_ingest_forward_passes(worker, delta.forward_passes)
    if delta.calls_encoded_ahead:
        metrics.add_ingest_calls_encoded_ahead(worker, delta.calls_encoded_ahead)
    for stream_id, n in delta.queue_depths.items():
        if stream_id in open_streams:
            metrics.streams.set_ingest_queue_depth(stream_id, n)
    for stream_id, seconds in delta.lags_s.items():
        if stream_id in open_streams:
            metrics.streams.set_stream_lag(stream_id, seconds)
    for tier, gauges in delta.tiers.items():
        metrics.memory.set_tier(worker, tier, gauges.used_bytes, gauges.capacity_bytes, gauges.num_clusters)
    for direction, n in delta.transfer_bytes.items():
        if n:
            metrics.memory.add_transfer_bytes(worker, direction, n)
    for event, n in delta.allocator_events.items():
        if n:
            metrics.memory.add_allocator_events(worker, event, n)
    if delta.kernel_compiles:
        metrics.memory.add_kernel_compiles(worker, delta.kernel_compiles)
    if any(delta.host_chunks.values()) or delta.host_grow_wait_s:
        metrics.memory.add_host_growth(worker, delta.host_chunks, delta.host_grow_wait_s)
    if delta.host_pool_bytes is not None:  # not known before the engine loop's first stats: left as it was
        metrics.memory.set_host_pool_bytes(worker, delta.host_pool_bytes)
    if delta.device_hit_ratio is not None:  # unknown before the engine loop's first stats: left as it was
        metrics.memory.set_hit_ratio(worker, min(1.0, max(0.0, delta.device_hit_ratio)))
    metrics.memory.set_worker_health(
        worker, sources_failing=delta.sources_failing, engine_stalled_s=delta.engine_stalled_s
    )
    for part, seconds in delta.loop_seconds.items():
        metrics.engine_loop.add_engine_loop_seconds(worker, part, seconds)
    for between, seconds in delta.question_start_gaps:
        metrics.engine_loop.observe_question_start_gap(worker, between, seconds)
    for seconds in delta.answer_thread_waits_s:
        metrics.engine_loop.observe_answer_thread_wait(worker, seconds)
    if delta.durability is not None:
        metrics.durability.set_health(worker, delta.durability)
