"""Prometheus metrics of each worker's memory, on the registry ``MosaicMetrics`` owns: KV bytes per tier and moved
between tiers, the GPU allocator's events and the host page pool's growth, keyframes. The worker's health gauges and
its kernel compiles live here too, because their families sit among these in the scrape's order."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from mosaic_core.engine.results import ALLOCATOR_EVENTS as ENGINE_ALLOCATOR_EVENTS
from services.metadata.base import TIERS
from services.metric_checks import check_label, non_negative, worker_label

TRANSFER_DIRECTIONS = ("host_to_device", "device_to_host", "host_to_disk", "disk_to_host")
# The CUDA caching allocator's events on a worker's GPU (EngineStats.allocator_events): a retry is a device
# allocation that failed, after which the allocator gave back its cached blocks, a wait for all of the GPU's work, and
# tried again; device mallocs and frees are the allocator's calls to the driver.
ALLOCATOR_EVENTS = tuple(ENGINE_ALLOCATOR_EVENTS)
# How a worker's host page pool got a new chunk (EngineStats.host_chunks_*): pinned ahead on a thread of its own, or
# on the engine thread by a take that found none pinned ahead (or up front, pinned_host_bytes).
HOST_CHUNK_HOWS = ("ahead", "sync")


class MemoryMetrics:
    """Each worker's memory tiers, memory growth and keyframes, with its health gauges and kernel compiles."""

    def __init__(self, r: CollectorRegistry) -> None:
        self._add_memory_tiers(r)
        self._add_worker_health(r)
        self._add_memory_growth(r)
        self._add_keyframes(r)

    def _add_memory_tiers(self, r: CollectorRegistry) -> None:
        self.transfer_bytes_total = Counter(
            "mosaic_transfer_bytes_total",
            "KV bytes moved between tiers.",
            ["worker", "direction"],
            registry=r,
        )
        self.tier_used_bytes = Gauge(
            "mosaic_tier_used_bytes", "KV bytes held per tier (keyframes included).", ["worker", "tier"], registry=r
        )
        self.tier_capacity_bytes = Gauge(
            "mosaic_tier_capacity_bytes", "Configured KV budget per tier.", ["worker", "tier"], registry=r
        )
        self.clusters = Gauge("mosaic_clusters", "Clusters resident per tier.", ["worker", "tier"], registry=r)
        self.cluster_device_hit_ratio = Gauge(
            "mosaic_cluster_device_hit_ratio",
            "Fraction of retrieved clusters already on device, since start.",
            ["worker"],
            registry=r,
        )

    def _add_worker_health(self, r: CollectorRegistry) -> None:
        self.sources_failing = Gauge(
            "mosaic_sources_failing",
            "Cameras the worker pulls whose source is in ERROR (GetStream's source_error says why): a failed source "
            "shows no lag and no drops, only this.",
            ["worker"],
            registry=r,
        )
        self.engine_stalled_seconds = Gauge(
            "mosaic_engine_stalled_seconds",
            "Seconds the worker's engine thread has gone without a chance to start a question (a stuck one grows "
            "without end; readiness leaves the worker out past 300 s).",
            ["worker"],
            registry=r,
        )

    def _add_memory_growth(self, r: CollectorRegistry) -> None:
        """The GPU allocator's events and the host page pool's new chunks."""
        self.device_allocator_events_total = Counter(
            "mosaic_device_allocator_events_total",
            "The CUDA caching allocator's events on the worker's GPU: retries (a failed allocation that gave back "
            "the cache, waiting for the GPU), device mallocs and frees, out-of-memory errors.",
            ["worker", "event"],
            registry=r,
        )
        self.host_chunks_total = Counter(
            "mosaic_host_chunks_total",
            "Chunks a worker's host page pool grew by: pinned ahead on a thread of their own, or on the engine "
            "thread (sync), which held it for the pinning.",
            ["worker", "how"],
            registry=r,
        )
        self.host_grow_wait_seconds_total = Counter(
            "mosaic_host_grow_wait_seconds_total",
            "Seconds a worker's engine thread spent pinning host chunks or waiting for one being pinned ahead.",
            ["worker"],
            registry=r,
        )
        self.host_pool_bytes = Gauge(
            "mosaic_host_pool_bytes",
            "Host memory a worker's host page pool holds (pinned on a GPU worker), the chunk pinned ahead included: "
            "the bytes its chunks asked for, which torch's pinned allocator rounds up to a power of two.",
            ["worker"],
            registry=r,
        )

    def _add_keyframes(self, r: CollectorRegistry) -> None:
        """Keyframes (docs/durability.md); the kernel compiles sit between their two families to keep the scrape's
        order."""
        self.keyframe_bytes = Gauge(
            "mosaic_keyframe_bytes",
            "JPEG keyframe bytes held with clusters (host memory; counted in the host and disk tier budgets).",
            ["worker"],
            registry=r,
        )
        self.kernel_compiles_total = Counter(
            "mosaic_kernel_compiles_total",
            "Variants of Mosaic's own Triton kernels a worker compiled (or loaded from Triton's disk cache) since it "
            "started, warm-up included: each held the work that launched it, about a second for a new one.",
            ["worker"],
            registry=r,
        )
        self.keyframes_dropped_total = Counter(
            "mosaic_keyframes_dropped_total",
            "Keyframes not kept because the host tier could not make room for them.",
            ["worker"],
            registry=r,
        )

    def add_transfer_bytes(self, worker: int | str, direction: str, n: int) -> None:
        check_label("direction", direction, TRANSFER_DIRECTIONS)
        self.transfer_bytes_total.labels(worker_label(worker), direction).inc(n)

    def set_tier(self, worker: int | str, tier: str, used_bytes: int, capacity_bytes: int, num_clusters: int) -> None:
        labels = (worker_label(worker), check_label("tier", tier, TIERS))
        self.tier_used_bytes.labels(*labels).set(non_negative("used_bytes", used_bytes))
        self.tier_capacity_bytes.labels(*labels).set(non_negative("capacity_bytes", capacity_bytes))
        self.clusters.labels(*labels).set(non_negative("num_clusters", num_clusters))

    def set_worker_health(self, worker: int | str, *, sources_failing: int, engine_stalled_s: float) -> None:
        label = worker_label(worker)
        self.sources_failing.labels(label).set(non_negative("failing sources", sources_failing))
        self.engine_stalled_seconds.labels(label).set(max(0.0, engine_stalled_s))

    def set_hit_ratio(self, worker: int | str, r: float) -> None:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"hit ratio {r!r} must be within [0, 1]")
        self.cluster_device_hit_ratio.labels(worker_label(worker)).set(r)

    def add_allocator_events(self, worker: int | str, event: str, n: int) -> None:
        check_label("event", event, ALLOCATOR_EVENTS)
        self.device_allocator_events_total.labels(worker_label(worker), event).inc(non_negative("events", n))

    def add_kernel_compiles(self, worker: int | str, n: int) -> None:
        self.kernel_compiles_total.labels(worker_label(worker)).inc(non_negative("kernel compiles", n))

    def add_host_growth(self, worker: int | str, chunks: dict[str, int], wait_s: float) -> None:
        """Host chunks a worker's pool grew by since the last call, by ``HOST_CHUNK_HOWS``, and the seconds its engine
        thread spent on them."""
        label = worker_label(worker)
        for how, n in chunks.items():
            self.host_chunks_total.labels(label, check_label("how", how, HOST_CHUNK_HOWS)).inc(
                non_negative("chunks", n)
            )
        self.host_grow_wait_seconds_total.labels(label).inc(non_negative("host grow wait", wait_s))

    def set_host_pool_bytes(self, worker: int | str, num_bytes: int) -> None:
        self.host_pool_bytes.labels(worker_label(worker)).set(non_negative("host pool bytes", num_bytes))

    def set_keyframes(self, worker: int | str, num_bytes: int, dropped: int) -> None:
        """A worker's keyframe bytes now (gauge) and keyframes dropped since the last call (increment)."""
        label = worker_label(worker)
        self.keyframe_bytes.labels(label).set(non_negative("keyframe bytes", num_bytes))
        self.keyframes_dropped_total.labels(label).inc(non_negative("keyframes dropped", dropped))

    def forget_worker(self, worker: int | str) -> None:
        """Drops every series of a worker that stopped answering but its dropped keyframes."""
        label = worker_label(worker)
        for metric in (
            self.cluster_device_hit_ratio, self.keyframe_bytes, self.kernel_compiles_total, self.sources_failing,
            self.engine_stalled_seconds, self.host_grow_wait_seconds_total, self.host_pool_bytes,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):  # a series never set
                metric.remove(label)
        for direction in TRANSFER_DIRECTIONS:
            self.transfer_bytes_total.remove(label, direction)
        for event in ALLOCATOR_EVENTS:
            self.device_allocator_events_total.remove(label, event)
        for how in HOST_CHUNK_HOWS:
            self.host_chunks_total.remove(label, how)
        for tier in TIERS:
            for metric in (self.tier_used_bytes, self.tier_capacity_bytes, self.clusters):
                metric.remove(label, tier)

    def prime_worker(self, worker: str) -> None:
        """Creates a worker's zero-valued series in every family, for every enum value; never changes a value."""
        self.cluster_device_hit_ratio.labels(worker)
        for metric in (
            self.keyframe_bytes, self.keyframes_dropped_total, self.kernel_compiles_total, self.sources_failing,
            self.engine_stalled_seconds, self.host_grow_wait_seconds_total, self.host_pool_bytes,
        ):  # fmt: skip
            metric.labels(worker)
        for direction in TRANSFER_DIRECTIONS:
            self.transfer_bytes_total.labels(worker, direction)
        for event in ALLOCATOR_EVENTS:
            self.device_allocator_events_total.labels(worker, event)
        for how in HOST_CHUNK_HOWS:
            self.host_chunks_total.labels(worker, how)
        for tier in TIERS:
            for metric in (self.tier_used_bytes, self.tier_capacity_bytes, self.clusters):
                metric.labels(worker, tier)
