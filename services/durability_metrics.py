"""Prometheus metrics of a worker's durable history and metadata index (docs/durability.md), on the registry
``MosaicMetrics`` owns."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.metric_checks import check_label, non_negative, worker_label

# Why a worker keeps a stream found at its start on disk without serving it: mosaic_core.durable.loading.LEFT_REASONS.
UNSERVED_REASONS = ("no_room", "read_failed", "not_moved", "record_refused")


class DurabilityMetrics:
    """Each worker's metadata writes, record writers, history on disk and what a restart set aside."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.worker_pid = Gauge(
            "mosaic_worker_pid", "Process id of each worker (0 until it first reports).", ["worker"], registry=r
        )
        self._add_metadata_writes(r)
        self._add_record_writes(r)
        self._add_restart(r)
        self._add_history_on_disk(r)

    def _add_metadata_writes(self, r: CollectorRegistry) -> None:
        self.metadata_store_up = Gauge(
            "mosaic_metadata_store_up", "1 if the worker's last metadata write succeeded.", ["worker"], registry=r
        )
        self.metadata_queue_depth = Gauge(
            "mosaic_metadata_write_queue_depth", "Metadata writes waiting behind the engine.", ["worker"], registry=r
        )
        self.metadata_writes_dropped_total = Counter(
            "mosaic_metadata_writes_dropped_total",
            "Metadata writes dropped from the full write-behind queue (a full resync repairs the index).",
            ["worker"],
            registry=r,
        )
        self.metadata_resyncs_total = Counter(
            "mosaic_metadata_resyncs_total",
            "Full re-publications of a worker's streams and clusters.",
            ["worker"],
            registry=r,
        )

    def _add_record_writes(self, r: CollectorRegistry) -> None:
        """Sealed clusters waiting for the record writers, and what the writers wrote."""
        self.durable_pending_clusters = Gauge(
            "mosaic_durable_pending_clusters", "Sealed clusters not yet on disk.", ["worker"], registry=r
        )
        self.durable_oldest_pending_seconds = Gauge(
            "mosaic_durable_oldest_pending_seconds",
            "Age of the oldest sealed cluster not yet on disk.",
            ["worker"],
            registry=r,
        )
        self.durable_clusters_written_total = Counter(
            "mosaic_durable_clusters_written_total", "Sealed clusters written to disk.", ["worker"], registry=r
        )
        self.durable_write_errors_total = Counter(
            "mosaic_durable_write_errors_total", "Failed writes of cluster records.", ["worker"], registry=r
        )
        self.durable_bytes_written_total = Counter(
            "mosaic_durable_bytes_written_total", "Bytes of cluster records written to disk.", ["worker"], registry=r
        )
        self.durable_write_seconds_total = Counter(
            "mosaic_durable_write_seconds_total",
            "Time the record writers spent on files (checksum, write, fsync), summed over the writer threads.",
            ["worker"],
            registry=r,
        )

    def _add_restart(self, r: CollectorRegistry) -> None:
        """What a worker's start restored from its data folder, set aside or left unserved."""
        self.durable_set_aside_total = Counter(
            "mosaic_durable_set_aside_total",
            "History a restart could not restore, moved under the data folder's .unreadable and kept for a person: "
            "whole streams (what=stream: a journal this version cannot read, KV of another model's shape) and "
            "single records whose summary could not be read (what=cluster). The worker's log says why.",
            ["worker", "what"],
            registry=r,
        )
        self.durable_unserved_streams = Gauge(
            "mosaic_durable_unserved_streams",
            "Streams a worker found in its data folder at its start and keeps there, under their ids, without serving "
            "them, by reason: no_room (the device had no room for the stream's window), read_failed (the disk failed "
            "to read it), not_moved (this version cannot restore it, and moving it under .unreadable failed too), "
            "record_refused (the service no longer accepts the record stored with it). A start that restores them "
            "clears them; until then each holds its stream id. The worker's log names them.",
            ["worker", "reason"],
            registry=r,
        )
        self.durable_restore_seconds = Gauge(
            "mosaic_durable_restore_seconds",
            "How long the worker process's start took to restore its streams from its data folder (reading them, "
            "reopening them, starting their sources). The router waits for it as long as it makes progress; the "
            "worker's log shows that progress while it runs.",
            ["worker"],
            registry=r,
        )
        self.durable_restored_streams = Gauge(
            "mosaic_durable_restored_streams",
            "Streams the worker process restored from its data folder at its start (that start's count: a stream "
            "deleted since still counts).",
            ["worker"],
            registry=r,
        )

    def _add_history_on_disk(self, r: CollectorRegistry) -> None:
        """The record writers' threads, the engine thread's wait for them, and the history's size against its
        budget."""
        self.durable_writers = Gauge(
            "mosaic_durable_writers",
            "Threads that write cluster records; mosaic_durable_write_seconds_total near this many a second means "
            "they are saturated.",
            ["worker"],
            registry=r,
        )
        self.durable_history_bytes = Gauge(
            "mosaic_durable_history_bytes",
            "Bytes of the sealed clusters' records a worker keeps on disk (KV and keyframes).",
            ["worker"],
            registry=r,
        )
        self.durable_history_budget_bytes = Gauge(
            "mosaic_durable_history_budget_bytes",
            "A worker's history_budget_bytes (0: no limit, retention alone bounds the history).",
            ["worker"],
            registry=r,
        )
        self.durable_clusters_dropped_for_space_total = Counter(
            "mosaic_durable_clusters_dropped_for_space_total",
            "Sealed clusters a worker dropped, the oldest first, to keep its records within history_budget_bytes.",
            ["worker"],
            registry=r,
        )
        self.durable_ingest_wait_seconds_total = Counter(
            "mosaic_durable_ingest_wait_seconds_total",
            "Time the engine thread waited for the record writers to make room for a sealed cluster's snapshot.",
            ["worker"],
            registry=r,
        )

    def set_health(self, worker: int | str, health) -> None:
        """Applies a worker's ``DurabilityHealth`` (gauges as values, counters as increments)."""
        label = worker_label(worker)
        self.worker_pid.labels(label).set(health.pid)
        self.metadata_store_up.labels(label).set(1 if health.store_up else 0)
        self.metadata_queue_depth.labels(label).set(non_negative("queue depth", health.queue_depth))
        self.metadata_writes_dropped_total.labels(label).inc(non_negative("dropped", health.writes_dropped))
        self.metadata_resyncs_total.labels(label).inc(non_negative("resyncs", health.resyncs))
        self.durable_pending_clusters.labels(label).set(non_negative("pending", health.pending_clusters))
        self.durable_oldest_pending_seconds.labels(label).set(non_negative("pending age", health.oldest_pending_s))
        self.durable_clusters_written_total.labels(label).inc(non_negative("written", health.clusters_written))
        self.durable_write_errors_total.labels(label).inc(non_negative("write errors", health.write_errors))
        self.durable_bytes_written_total.labels(label).inc(non_negative("bytes written", health.bytes_written))
        self.durable_write_seconds_total.labels(label).inc(non_negative("write seconds", health.write_s))
        self.durable_ingest_wait_seconds_total.labels(label).inc(non_negative("ingest wait", health.ingest_wait_s))
        self.durable_writers.labels(label).set(non_negative("writers", health.writers))
        self.durable_restore_seconds.labels(label).set(non_negative("restore seconds", health.restore_s))
        self.durable_restored_streams.labels(label).set(non_negative("restored streams", health.streams_restored))
        self.durable_history_bytes.labels(label).set(non_negative("history bytes", health.history_bytes))
        self.durable_history_budget_bytes.labels(label).set(non_negative("history budget", health.history_budget_bytes))
        self.durable_clusters_dropped_for_space_total.labels(label).inc(
            non_negative("dropped for space", health.clusters_dropped_for_space)
        )
        self.durable_set_aside_total.labels(label, "stream").inc(non_negative("set aside", health.streams_set_aside))
        self.durable_set_aside_total.labels(label, "cluster").inc(non_negative("set aside", health.clusters_set_aside))
        for reason in health.streams_unserved:
            check_label("unserved reason", reason, UNSERVED_REASONS)
        for reason in UNSERVED_REASONS:
            unserved = non_negative("unserved streams", health.streams_unserved.get(reason, 0))
            self.durable_unserved_streams.labels(label, reason).set(unserved)

    def prime_worker(self, worker: str) -> None:
        """A worker's zero-valued series, but ``mosaic_metadata_store_up``'s: its 0 says the last write failed, and
        before the worker's first report (minutes, as it loads its model) nothing is known of its writes."""
        for metric in (
            self.worker_pid, self.metadata_queue_depth, self.metadata_writes_dropped_total,
            self.metadata_resyncs_total, self.durable_pending_clusters, self.durable_oldest_pending_seconds,
            self.durable_clusters_written_total, self.durable_write_errors_total, self.durable_bytes_written_total,
            self.durable_write_seconds_total, self.durable_ingest_wait_seconds_total, self.durable_writers,
            self.durable_history_bytes, self.durable_history_budget_bytes,
            self.durable_clusters_dropped_for_space_total, self.durable_restore_seconds, self.durable_restored_streams,
        ):  # fmt: skip
            metric.labels(worker)
        for what in ("stream", "cluster"):
            self.durable_set_aside_total.labels(worker, what)
        for reason in UNSERVED_REASONS:
            self.durable_unserved_streams.labels(worker, reason)

    def forget_worker(self, worker: int | str) -> None:
        """Drops a worker's gauges (its counters stay)."""
        label = worker_label(worker)
        for metric in (
            self.worker_pid, self.metadata_store_up, self.metadata_queue_depth, self.durable_pending_clusters,
            self.durable_oldest_pending_seconds, self.durable_writers, self.durable_history_bytes,
            self.durable_history_budget_bytes, self.durable_restore_seconds, self.durable_restored_streams,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):  # a series never set
                metric.remove(label)
        for reason in UNSERVED_REASONS:
            with contextlib.suppress(KeyError):
                self.durable_unserved_streams.remove(label, reason)
