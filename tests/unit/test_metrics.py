"""MosaicMetrics: the spec's names and types, bounded labels, label validation and a parseable scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import MosaicMetrics
from services.stream_metrics import STREAM_OTHER

# Every family the service exports -> (type, labels); a new one is added here on purpose.
SPEC = {
    "mosaic_frames_received_total": ("counter", {"stream"}),
    "mosaic_frames_ingested_total": ("counter", {"stream"}),
    "mosaic_frames_dropped_total": ("counter", {"stream", "reason"}),
    "mosaic_ingest_queue_depth": ("gauge", {"stream"}),
    "mosaic_stream_lag_seconds": ("gauge", {"stream"}),
    "mosaic_ingest_latency_seconds": ("histogram", {"worker"}),
    "mosaic_ingest_batch_frames": ("histogram", {"worker"}),
    "mosaic_ingest_forward_passes_total": ("counter", {"worker"}),
    "mosaic_ingest_calls_encoded_ahead_total": ("counter", {"worker"}),
    "mosaic_engine_loop_seconds_total": ("counter", {"worker", "part"}),
    "mosaic_question_start_gap_seconds": ("histogram", {"worker", "between"}),
    "mosaic_answer_thread_wait_seconds": ("histogram", {"worker"}),
    "mosaic_durable_history_bytes": ("gauge", {"worker"}),
    "mosaic_durable_history_budget_bytes": ("gauge", {"worker"}),
    "mosaic_durable_clusters_dropped_for_space_total": ("counter", {"worker"}),
    "mosaic_durable_set_aside_total": ("counter", {"worker", "what"}),
    "mosaic_durable_unserved_streams": ("gauge", {"worker", "reason"}),
    "mosaic_durable_restore_seconds": ("gauge", {"worker"}),
    "mosaic_durable_restored_streams": ("gauge", {"worker"}),
    "mosaic_query_queue_depth": ("gauge", set()),
    "mosaic_queries_running": ("gauge", set()),
    "mosaic_queries_total": ("counter", {"outcome"}),
    "mosaic_time_to_first_token_seconds": ("histogram", {"mode"}),
    "mosaic_inter_token_latency_seconds": ("histogram", {"mode"}),
    "mosaic_retrieval_latency_seconds": ("histogram", {"mode"}),
    "mosaic_transfer_bytes_total": ("counter", {"worker", "direction"}),
    "mosaic_device_allocator_events_total": ("counter", {"worker", "event"}),
    "mosaic_kernel_compiles_total": ("counter", {"worker"}),
    "mosaic_host_chunks_total": ("counter", {"worker", "how"}),
    "mosaic_host_grow_wait_seconds_total": ("counter", {"worker"}),
    "mosaic_host_pool_bytes": ("gauge", {"worker"}),
    "mosaic_tier_used_bytes": ("gauge", {"worker", "tier"}),
    "mosaic_tier_capacity_bytes": ("gauge", {"worker", "tier"}),
    "mosaic_clusters": ("gauge", {"worker", "tier"}),
    "mosaic_cluster_device_hit_ratio": ("gauge", {"worker"}),
    "mosaic_sources_failing": ("gauge", {"worker"}),
    "mosaic_engine_stalled_seconds": ("gauge", {"worker"}),
    "mosaic_active_streams": ("gauge", set()),
    "mosaic_workers_up": ("gauge", set()),
    "mosaic_workers_starting": ("gauge", set()),
    "mosaic_workers_gone": ("gauge", set()),
    "mosaic_errors_total": ("counter", {"code"}),
    # Durability and the metadata index (docs/durability.md).
    "mosaic_worker_pid": ("gauge", {"worker"}),
    "mosaic_metadata_store_up": ("gauge", {"worker"}),
    "mosaic_metadata_write_queue_depth": ("gauge", {"worker"}),
    "mosaic_metadata_writes_dropped_total": ("counter", {"worker"}),
    "mosaic_metadata_resyncs_total": ("counter", {"worker"}),
    "mosaic_durable_pending_clusters": ("gauge", {"worker"}),
    "mosaic_durable_oldest_pending_seconds": ("gauge", {"worker"}),
    "mosaic_durable_clusters_written_total": ("counter", {"worker"}),
    "mosaic_durable_write_errors_total": ("counter", {"worker"}),
    "mosaic_durable_bytes_written_total": ("counter", {"worker"}),
    "mosaic_durable_write_seconds_total": ("counter", {"worker"}),
    "mosaic_durable_ingest_wait_seconds_total": ("counter", {"worker"}),
    "mosaic_durable_writers": ("gauge", {"worker"}),
    # Keyframes (docs/durability.md).
    "mosaic_keyframe_bytes": ("gauge", {"worker"}),
    "mosaic_keyframes_dropped_total": ("counter", {"worker"}),
    # Standing questions (docs/watches.md).
    "mosaic_watches": ("gauge", set()),
    "mosaic_watch_evaluations_total": ("counter", set()),
    "mosaic_watch_events_total": ("counter", set()),
    "mosaic_watch_suppressed_total": ("counter", {"reason"}),
    "mosaic_watch_events_dropped_total": ("counter", {"reason"}),
    "mosaic_watch_seal_to_event_seconds": ("histogram", set()),
    "mosaic_watch_score_seconds": ("histogram", set()),
    "mosaic_watch_subscribers": ("gauge", set()),
    "mosaic_watch_webhook_deliveries_total": ("counter", {"outcome"}),
}
# Families prime() leaves without a sample: any value would claim what is not known before a worker reports.
UNKNOWN_UNTIL_REPORTED = {"mosaic_metadata_store_up"}


def families(metrics: MosaicMetrics) -> dict:
    """Parsed scrape keyed by exposed name (counters get their _total back).

    prometheus_client also exposes a ``<name>_created`` gauge per counter and histogram in the text format
    (unless PROMETHEUS_DISABLE_CREATED_SERIES is set); those are exposition details, not spec metrics.
    """
    out = {}
    for family in text_string_to_metric_families(metrics.scrape()):
        if family.name.endswith("_created"):
            assert family.name.startswith("mosaic_")
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def sample(metrics: MosaicMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_primed_scrape_lists_exactly_the_spec_families() -> None:
    metrics = MosaicMetrics()
    metrics.prime()
    got = families(metrics)
    assert set(got) == set(SPEC)
    for name, (kind, labels) in SPEC.items():
        family = got[name]
        assert family.type == kind, name
        assert family.documentation, f"{name} has no help text"
        assert family.samples or name in UNKNOWN_UNTIL_REPORTED, f"{name} emits no sample after prime()"
        for s in family.samples:
            assert s.name.startswith("mosaic_")
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
        if kind == "counter":
            assert name.endswith("_total")
        else:
            assert not name.endswith("_total")


def test_unprimed_registry_is_private_and_histograms_without_labels_still_scrape() -> None:
    a, b = MosaicMetrics(), MosaicMetrics()  # two instances must not clash on the global registry
    a.set_workers_up(3)
    assert sample(b, "mosaic_workers_up") == 0.0
    registry = CollectorRegistry()
    c = MosaicMetrics(registry)
    assert c.registry is registry
    assert "mosaic_active_streams" in families(c)


def test_every_method_moves_its_metric() -> None:
    m = MosaicMetrics()
    m.streams.frame_received("cam-1")
    m.streams.frame_received("cam-1", 4)
    m.streams.frames_ingested("cam-1", 3)
    m.streams.frame_dropped("cam-1", "queue_full")
    m.streams.set_ingest_queue_depth("cam-1", 7)
    m.streams.set_stream_lag("cam-1", 1.5)
    m.observe_ingest_latency(0, 0.2)
    m.observe_ingest_batch("1", 16)
    m.add_ingest_forward_passes("1", 2)
    m.add_ingest_calls_encoded_ahead("1", 1)
    m.engine_loop.add_engine_loop_seconds("1", "ingest", 0.25)
    m.engine_loop.add_engine_loop_seconds("1", "ingest", 0.5)
    m.set_query_queue_depth(2)
    m.query_finished("deadline")
    m.observe_ttft("cluster", 0.03)
    m.observe_inter_token("token", 0.008)
    m.observe_retrieval("full", 0.001)
    m.memory.add_transfer_bytes(0, "host_to_device", 1 << 20)
    m.memory.add_allocator_events(0, "retries", 2)
    m.memory.set_tier(0, "host", used_bytes=100, capacity_bytes=1000, num_clusters=4)
    m.memory.set_hit_ratio(0, 0.75)
    m.set_active_streams(12)
    m.set_workers_up(2)
    m.error("RESOURCE_EXHAUSTED")
    m.memory.set_keyframes(0, num_bytes=4096, dropped=2)
    m.memory.set_keyframes(0, num_bytes=1024, dropped=1)
    s = lambda name, **kw: sample(m, name, **kw)  # noqa: E731
    assert s("mosaic_frames_received_total", stream="cam-1") == 5
    assert s("mosaic_frames_ingested_total", stream="cam-1") == 3
    assert s("mosaic_frames_dropped_total", stream="cam-1", reason="queue_full") == 1
    assert s("mosaic_ingest_queue_depth", stream="cam-1") == 7
    assert s("mosaic_stream_lag_seconds", stream="cam-1") == 1.5
    assert s("mosaic_ingest_latency_seconds_count", worker="0") == 1
    assert s("mosaic_ingest_batch_frames_sum", worker="1") == 16
    assert s("mosaic_ingest_forward_passes_total", worker="1") == 2
    assert s("mosaic_ingest_calls_encoded_ahead_total", worker="1") == 1
    assert s("mosaic_engine_loop_seconds_total", worker="1", part="ingest") == 0.75
    assert s("mosaic_query_queue_depth") == 2
    assert s("mosaic_queries_total", outcome="deadline") == 1
    assert s("mosaic_time_to_first_token_seconds_bucket", mode="cluster", le="0.04") == 1
    assert s("mosaic_time_to_first_token_seconds_bucket", mode="cluster", le="0.02") == 0
    assert s("mosaic_inter_token_latency_seconds_count", mode="token") == 1
    assert s("mosaic_retrieval_latency_seconds_count", mode="full") == 1
    assert s("mosaic_transfer_bytes_total", worker="0", direction="host_to_device") == 1 << 20
    assert s("mosaic_device_allocator_events_total", worker="0", event="retries") == 2
    assert s("mosaic_tier_used_bytes", worker="0", tier="host") == 100
    assert s("mosaic_tier_capacity_bytes", worker="0", tier="host") == 1000
    assert s("mosaic_clusters", worker="0", tier="host") == 4
    assert s("mosaic_cluster_device_hit_ratio", worker="0") == 0.75
    assert s("mosaic_active_streams") == 12
    assert s("mosaic_workers_up") == 2
    assert s("mosaic_errors_total", code="RESOURCE_EXHAUSTED") == 1
    assert s("mosaic_keyframe_bytes", worker="0") == 1024
    assert s("mosaic_keyframes_dropped_total", worker="0") == 3


def test_stream_labels_are_bounded() -> None:
    m = MosaicMetrics(max_stream_labels=64)
    for i in range(200):
        m.streams.frame_received(f"cam-{i}")
        m.streams.frame_dropped(f"cam-{i}", "invalid")
        m.streams.set_ingest_queue_depth(f"cam-{i}", 1)
    for name in ("mosaic_frames_received_total", "mosaic_frames_dropped_total", "mosaic_ingest_queue_depth"):
        values = {s.labels["stream"] for s in families(m)[name].samples if s.name == name}
        assert len(values) == 65, name
        assert STREAM_OTHER in values and "cam-63" in values and "cam-64" not in values
    assert sample(m, "mosaic_frames_received_total", stream=STREAM_OTHER) == 136
    assert sample(m, "mosaic_ingest_queue_depth", stream=STREAM_OTHER) == 136  # a sum over the overflow


def _overflow_of_two() -> MosaicMetrics:
    """One labelled stream ("own") and two in ``_other``: "a" (lag 2 s, 3 queued) and "b" (lag 120 s, 4 queued)."""
    m = MosaicMetrics(max_stream_labels=1)
    m.streams.set_stream_lag("own", 9.0)
    m.streams.set_stream_lag("a", 2.0)
    m.streams.set_stream_lag("b", 120.0)
    m.streams.set_ingest_queue_depth("a", 3)
    m.streams.set_ingest_queue_depth("b", 4)
    return m


def test_overflow_gauges_aggregate() -> None:
    m = _overflow_of_two()
    assert sample(m, "mosaic_stream_lag_seconds", stream=STREAM_OTHER) == 120.0  # the worst overflow stream
    assert sample(m, "mosaic_ingest_queue_depth", stream=STREAM_OTHER) == 7


@pytest.mark.parametrize("forget", ["forget_stream", "forget_stream_gauges"])
def test_an_overflow_stream_forgotten_leaves_the_overflow_gauges(forget: str) -> None:
    """A deleted stream (``forget_stream``) or one its restarted worker no longer holds (``forget_stream_gauges``)
    in ``_other``: its share of the overflow lag and depth goes. Before, ``forget_stream_gauges`` left it, so the
    worst lag of ``_other`` stayed at its last value (grown while the worker was silent) for good, and
    MosaicStreamFallingBehind fired on the other overflow streams' frames."""
    m = _overflow_of_two()
    getattr(m.streams, forget)("b")
    assert sample(m, "mosaic_stream_lag_seconds", stream=STREAM_OTHER) == 2.0
    assert sample(m, "mosaic_ingest_queue_depth", stream=STREAM_OTHER) == 3


def test_a_stream_no_worker_reports_keeps_its_counters_label() -> None:
    m = _overflow_of_two()
    m.streams.forget_stream_gauges("b")
    assert m.streams.stream_label("b") == STREAM_OTHER  # its counters stay where they were counted


def test_forget_stream_frees_its_series_and_slot() -> None:
    m = MosaicMetrics(max_stream_labels=2)
    m.streams.frame_received("a")
    m.streams.frame_dropped("a", "decode_error")
    m.streams.frame_received("b")
    m.streams.frame_received("c")  # overflow
    m.streams.forget_stream("a")
    assert sample(m, "mosaic_frames_received_total", stream="a") is None
    assert sample(m, "mosaic_frames_dropped_total", stream="a", reason="decode_error") is None
    assert m.streams.stream_label("d") == "d"  # the freed slot goes to the next new stream
    assert m.streams.stream_label("c") == STREAM_OTHER  # an overflow stream stays where it was counted
    assert m.streams.stream_label(STREAM_OTHER) == STREAM_OTHER


def test_forget_worker() -> None:
    m = MosaicMetrics()
    m.memory.set_tier(3, "disk", 1, 2, 3)
    m.memory.add_transfer_bytes(3, "disk_to_host", 5)
    m.memory.set_hit_ratio(3, 0.5)
    m.forget_worker("3")
    text = m.scrape()
    assert 'worker="3"' not in text


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.streams.frame_dropped("a", "overflow"),
        lambda m: m.query_finished("success"),
        lambda m: m.observe_ttft("mosaic", 0.1),
        lambda m: m.memory.add_transfer_bytes(0, "device_to_disk", 1),
        lambda m: m.memory.set_tier(0, "gpu", 1, 1, 1),
        lambda m: m.error("OK"),
        lambda m: m.error("not_found"),
        lambda m: m.observe_ingest_latency("gpu0", 0.1),
        lambda m: m.memory.set_hit_ratio(0, 1.5),
        lambda m: m.streams.set_ingest_queue_depth("a", -1),
        lambda m: m.observe_retrieval("cluster", float("nan")),
        lambda m: m.memory.add_transfer_bytes(0, "host_to_disk", -1),
        lambda m: m.engine_loop.add_engine_loop_seconds(0, "decode", 1.0),
        lambda m: m.engine_loop.add_engine_loop_seconds(0, "idle", -1.0),
    ],
)
def test_invalid_label_values_and_amounts_raise(call) -> None:
    m = MosaicMetrics()
    with pytest.raises(ValueError):
        call(m)


def test_prime_keeps_existing_values() -> None:
    m = MosaicMetrics(max_stream_labels=0)
    m.streams.frame_received("x", 3)
    m.streams.set_ingest_queue_depth("x", 5)
    m.prime(worker_ids=("0", 1))
    assert sample(m, "mosaic_frames_received_total", stream=STREAM_OTHER) == 3
    assert sample(m, "mosaic_ingest_queue_depth", stream=STREAM_OTHER) == 5
    assert sample(m, "mosaic_tier_capacity_bytes", worker="1", tier="disk") == 0
    assert sample(m, "mosaic_errors_total", code="UNAVAILABLE") == 0


def test_durable_writing_reaches_its_counters_as_increments() -> None:
    from mosaic_core.durable.store import DurableStats
    from services.publisher import PublisherStats
    from services.telemetry import DurabilityHealth, durability_health

    m = MosaicMetrics()
    seen = DurabilityHealth()
    for written, write_s, waits in ((10 << 20, 2.0, (0.5, 0.25)), (30 << 20, 5.0, (0.5, 1.0))):
        durable = DurableStats(bytes_written=written, file_write_s=write_s, writers=8)
        durable.submit_wait_s, durable.staging_wait_s = waits
        now = durability_health(7, PublisherStats(), durable)
        m.durability.set_health(0, now.increments_since(seen))
        seen = now
    assert sample(m, "mosaic_durable_bytes_written_total", worker="0") == 30 << 20
    assert sample(m, "mosaic_durable_write_seconds_total", worker="0") == 5.0
    assert sample(m, "mosaic_durable_ingest_wait_seconds_total", worker="0") == 1.5
    assert sample(m, "mosaic_durable_writers", worker="0") == 8  # a gauge: set, not summed over the two drains


def test_history_a_restart_set_aside_is_counted_by_what_it_was() -> None:
    from mosaic_core.durable.store import DurableStats
    from services.publisher import PublisherStats
    from services.telemetry import DurabilityHealth, durability_health

    m = MosaicMetrics()
    now = durability_health(7, PublisherStats(), DurableStats(streams_set_aside=2, clusters_set_aside=3))
    m.durability.set_health(0, now.increments_since(DurabilityHealth()))
    m.durability.set_health(0, now.increments_since(now))  # the next drain: nothing new
    assert sample(m, "mosaic_durable_set_aside_total", worker="0", what="stream") == 2
    assert sample(m, "mosaic_durable_set_aside_total", worker="0", what="cluster") == 3


def test_streams_a_start_left_unserved_are_a_gauge_by_reason_until_the_worker_goes() -> None:
    """Held as long as the worker process lives (each drain says it again, not summed), 0 for the other reasons,
    and gone with the worker's other gauges."""
    from mosaic_core.durable.store import DurableStats
    from services.publisher import PublisherStats
    from services.telemetry import DurabilityHealth, durability_health

    m = MosaicMetrics()
    now = durability_health(7, PublisherStats(), DurableStats(streams_left={"no_room": 2, "read_failed": 1}))
    m.durability.set_health(0, now.increments_since(DurabilityHealth()))
    m.durability.set_health(0, now.increments_since(now))  # the next drain
    unserved = {
        reason: sample(m, "mosaic_durable_unserved_streams", worker="0", reason=reason)
        for reason in ("no_room", "read_failed", "not_moved", "record_refused")
    }
    assert unserved == {"no_room": 2, "read_failed": 1, "not_moved": 0, "record_refused": 0}
    m.forget_worker(0)
    assert sample(m, "mosaic_durable_unserved_streams", worker="0", reason="no_room") is None


def test_what_a_start_restored_and_how_long_it_took_are_gauges_until_the_worker_goes() -> None:
    from mosaic_core.durable.store import DurableStats
    from services.publisher import PublisherStats
    from services.telemetry import DurabilityHealth, durability_health

    m = MosaicMetrics()
    now = durability_health(7, PublisherStats(), DurableStats(), restore_s=95.5, streams_restored=298)
    m.durability.set_health(0, now.increments_since(DurabilityHealth()))
    m.durability.set_health(0, now.increments_since(now))  # the next drain says it again, not summed
    assert sample(m, "mosaic_durable_restore_seconds", worker="0") == 95.5
    assert sample(m, "mosaic_durable_restored_streams", worker="0") == 298
    m.forget_worker(0)
    assert sample(m, "mosaic_durable_restore_seconds", worker="0") is None
    assert sample(m, "mosaic_durable_restored_streams", worker="0") is None


def test_the_unserved_reasons_are_the_stores() -> None:
    from mosaic_core.durable.loading import LEFT_REASONS
    from services.durability_metrics import UNSERVED_REASONS

    assert UNSERVED_REASONS == LEFT_REASONS


def test_allocator_events_reach_their_counter_as_increments_of_the_engines_totals() -> None:
    """The engine reports the allocator's counts since the process started; each drain sends what they grew by."""
    from mosaic_core.engine.results import EngineStats
    from services.telemetry import WorkerTelemetry, apply_delta

    def stats(retries: int, mallocs: int, compiles: int | None = None) -> EngineStats:
        tiers = {"device": 0, "host": 0, "disk": 0}
        return EngineStats(
            mode="cluster", num_streams=0, used_bytes_by_tier=tiers, capacity_bytes_by_tier=tiers,
            clusters_by_tier=tiers, transfer_bytes_by_direction={}, transfer_copies_by_direction={},
            device_hit_ratio=0.0, allocator_events={"retries": retries, "device_mallocs": mallocs},
            kernel_compiles=compiles,
        )  # fmt: skip

    m, telemetry = MosaicMetrics(), WorkerTelemetry("0")
    for retries, mallocs, compiles in ((3, 40, 12), (3, 40, None), (5, 41, 12), (5, 41, 14)):
        delta = telemetry.drain(queue_depths={}, lags_s={}, engine_stats=stats(retries, mallocs, compiles))
        apply_delta(m, delta, open_streams=set())
    assert sample(m, "mosaic_device_allocator_events_total", worker="0", event="retries") == 5
    assert sample(m, "mosaic_device_allocator_events_total", worker="0", event="device_mallocs") == 41
    assert sample(m, "mosaic_kernel_compiles_total", worker="0") == 14  # None (not counted) adds nothing


def test_host_growth_reaches_its_counters_as_increments_of_the_engines_totals() -> None:
    from mosaic_core.engine.results import EngineStats
    from services.telemetry import WorkerTelemetry, apply_delta

    def stats(ahead: int, sync: int, wait_s: float) -> EngineStats:
        tiers = {"device": 0, "host": 0, "disk": 0}
        return EngineStats(
            mode="cluster", num_streams=0, used_bytes_by_tier=tiers, capacity_bytes_by_tier=tiers,
            clusters_by_tier=tiers, transfer_bytes_by_direction={}, transfer_copies_by_direction={},
            device_hit_ratio=0.0, host_chunks_ahead=ahead, host_chunks_sync=sync, host_grow_wait_s=wait_s,
            host_pool_bytes=(ahead + sync) << 28,
        )  # fmt: skip

    m, telemetry = MosaicMetrics(), WorkerTelemetry("0")
    for ahead, sync, wait_s in ((0, 1, 0.25), (3, 1, 0.25), (7, 2, 0.5)):
        apply_delta(
            m, telemetry.drain(queue_depths={}, lags_s={}, engine_stats=stats(ahead, sync, wait_s)), open_streams=set()
        )
    assert sample(m, "mosaic_host_chunks_total", worker="0", how="ahead") == 7
    assert sample(m, "mosaic_host_chunks_total", worker="0", how="sync") == 2
    assert sample(m, "mosaic_host_grow_wait_seconds_total", worker="0") == pytest.approx(0.5)
    assert sample(m, "mosaic_host_pool_bytes", worker="0") == 9 << 28  # the last drain's, not a sum
    m.forget_worker(0)
    assert sample(m, "mosaic_host_chunks_total", worker="0", how="ahead") is None
    assert sample(m, "mosaic_host_pool_bytes", worker="0") is None


def test_every_mode_the_service_accepts_is_observed() -> None:
    """``mosaic serve --mode frame`` validated, then every first token raised in the metrics."""
    from typing import get_args

    from services.config import ServiceConfig

    metrics = MosaicMetrics()
    for mode in get_args(ServiceConfig.model_fields["mode"].annotation):
        metrics.observe_ttft(mode, 0.1)
        assert metrics.registry.get_sample_value("mosaic_time_to_first_token_seconds_count", {"mode": mode}) == 1


def test_a_drain_without_engine_stats_leaves_the_host_pool_gauge_as_it_was() -> None:
    """A worker's loop has no engine stats until its first refresh: a drain then knows nothing of the pool, which
    holds its first chunk from the start, and must not say it holds nothing (the tier gauges are left as they are
    too)."""
    from mosaic_core.engine.results import EngineStats
    from services.telemetry import WorkerTelemetry, apply_delta

    tiers = {"device": 0, "host": 0, "disk": 0}
    stats = EngineStats(
        mode="cluster", num_streams=0, used_bytes_by_tier=tiers, capacity_bytes_by_tier=tiers, clusters_by_tier=tiers,
        transfer_bytes_by_direction={}, transfer_copies_by_direction={}, device_hit_ratio=0.0, host_pool_bytes=1 << 28,
    )  # fmt: skip
    m, telemetry = MosaicMetrics(), WorkerTelemetry("0")
    apply_delta(m, telemetry.drain(queue_depths={}, lags_s={}, engine_stats=stats), open_streams=set())
    apply_delta(m, telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None), open_streams=set())
    assert sample(m, "mosaic_host_pool_bytes", worker="0") == 1 << 28


def test_a_worker_not_heard_from_yet_is_not_said_to_have_lost_its_metadata_store() -> None:
    """The router primes its workers' series as it starts, minutes before a worker that loads its model first
    reports: a primed 0 read as "its last metadata write failed", and MosaicMetadataStoreDown (== 0 for 2 minutes)
    fired through every slow start. Unknown is no series, as after ``forget_worker``; the first report sets it."""
    from services.telemetry import DurabilityHealth

    m = MosaicMetrics()
    m.prime(worker_ids=("0",))
    assert sample(m, "mosaic_metadata_store_up", worker="0") is None
    m.durability.set_health("0", DurabilityHealth(pid=7, store_up=True))
    assert sample(m, "mosaic_metadata_store_up", worker="0") == 1
    m.durability.set_health("0", DurabilityHealth(pid=7, store_up=False))
    assert sample(m, "mosaic_metadata_store_up", worker="0") == 0


def test_a_drain_without_engine_stats_leaves_the_device_hit_ratio_as_it_was() -> None:
    """Nor does such a drain know the hit ratio: it must not read 0 (no retrieved cluster on the device) for a
    worker whose engine has not reported it yet."""
    from mosaic_core.engine.results import EngineStats
    from services.telemetry import WorkerTelemetry, apply_delta

    tiers = {"device": 0, "host": 0, "disk": 0}
    stats = EngineStats(
        mode="cluster", num_streams=0, used_bytes_by_tier=tiers, capacity_bytes_by_tier=tiers, clusters_by_tier=tiers,
        transfer_bytes_by_direction={}, transfer_copies_by_direction={}, device_hit_ratio=0.75,
    )  # fmt: skip
    m, telemetry = MosaicMetrics(), WorkerTelemetry("0")
    apply_delta(m, telemetry.drain(queue_depths={}, lags_s={}, engine_stats=stats), open_streams=set())
    apply_delta(m, telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None), open_streams=set())
    assert sample(m, "mosaic_cluster_device_hit_ratio", worker="0") == 0.75
    fresh = MosaicMetrics()
    apply_delta(fresh, WorkerTelemetry("1").drain(queue_depths={}, lags_s={}, engine_stats=None), open_streams=set())
    assert sample(fresh, "mosaic_cluster_device_hit_ratio", worker="1") is None
