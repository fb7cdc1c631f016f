"""The /metrics endpoint of a running service: scraped over HTTP, parsed with the Prometheus text parser,
linted with ``promtool check metrics``, and checked against what the service actually did."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_support import clip_frames, metric, scrape, wait_for, wait_ingested

from mosaic_core.config import MIB

# Every family the service exports, by name (without _total) -> type; a new one is added here on purpose.
SPEC = {
    "mosaic_frames_received": "counter",
    "mosaic_frames_ingested": "counter",
    "mosaic_frames_dropped": "counter",
    "mosaic_ingest_queue_depth": "gauge",
    "mosaic_stream_lag_seconds": "gauge",
    "mosaic_ingest_latency_seconds": "histogram",
    "mosaic_ingest_batch_frames": "histogram",
    "mosaic_ingest_forward_passes": "counter",
    "mosaic_ingest_calls_encoded_ahead": "counter",
    "mosaic_engine_loop_seconds": "counter",
    "mosaic_question_start_gap_seconds": "histogram",
    "mosaic_answer_thread_wait_seconds": "histogram",
    "mosaic_durable_history_bytes": "gauge",
    "mosaic_durable_history_budget_bytes": "gauge",
    "mosaic_durable_clusters_dropped_for_space": "counter",
    "mosaic_durable_set_aside": "counter",
    "mosaic_durable_unserved_streams": "gauge",
    "mosaic_durable_restore_seconds": "gauge",
    "mosaic_durable_restored_streams": "gauge",
    "mosaic_query_queue_depth": "gauge",
    "mosaic_queries_running": "gauge",
    "mosaic_queries": "counter",
    "mosaic_time_to_first_token_seconds": "histogram",
    "mosaic_inter_token_latency_seconds": "histogram",
    "mosaic_retrieval_latency_seconds": "histogram",
    "mosaic_transfer_bytes": "counter",
    "mosaic_device_allocator_events": "counter",
    "mosaic_kernel_compiles": "counter",
    "mosaic_host_chunks": "counter",
    "mosaic_host_grow_wait_seconds": "counter",
    "mosaic_host_pool_bytes": "gauge",
    "mosaic_tier_used_bytes": "gauge",
    "mosaic_tier_capacity_bytes": "gauge",
    "mosaic_clusters": "gauge",
    "mosaic_cluster_device_hit_ratio": "gauge",
    "mosaic_sources_failing": "gauge",
    "mosaic_engine_stalled_seconds": "gauge",
    "mosaic_active_streams": "gauge",
    "mosaic_workers_up": "gauge",
    "mosaic_workers_starting": "gauge",
    "mosaic_workers_gone": "gauge",
    "mosaic_errors": "counter",
    # Durability and the metadata index (docs/durability.md).
    "mosaic_worker_pid": "gauge",
    "mosaic_metadata_store_up": "gauge",
    "mosaic_metadata_write_queue_depth": "gauge",
    "mosaic_metadata_writes_dropped": "counter",
    "mosaic_metadata_resyncs": "counter",
    "mosaic_durable_pending_clusters": "gauge",
    "mosaic_durable_oldest_pending_seconds": "gauge",
    "mosaic_durable_clusters_written": "counter",
    "mosaic_durable_write_errors": "counter",
    "mosaic_durable_bytes_written": "counter",
    "mosaic_durable_write_seconds": "counter",
    "mosaic_durable_ingest_wait_seconds": "counter",
    "mosaic_durable_writers": "gauge",
    # Keyframes (docs/durability.md).
    "mosaic_keyframe_bytes": "gauge",
    "mosaic_keyframes_dropped": "counter",
    # Standing questions (docs/watches.md).
    "mosaic_watches": "gauge",
    "mosaic_watch_evaluations": "counter",
    "mosaic_watch_events": "counter",
    "mosaic_watch_suppressed": "counter",
    "mosaic_watch_events_dropped": "counter",
    "mosaic_watch_seal_to_event_seconds": "histogram",
    "mosaic_watch_score_seconds": "histogram",
    "mosaic_watch_subscribers": "gauge",
    "mosaic_watch_webhook_deliveries": "counter",
}
STREAM = "metrics-cam"


@pytest.fixture(scope="module")
def activity(client, service):
    """One stream with 10 ingested frames and two answered questions."""
    before = {
        "ok": metric(service.metrics_url, "mosaic_queries_total", outcome="ok"),
        "ttft": metric(service.metrics_url, "mosaic_time_to_first_token_seconds_count", mode="cluster"),
    }
    client.create_stream(STREAM, fps=2.0)
    client.push_frames((STREAM, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=10))
    wait_ingested(client, STREAM, 10)
    for _ in range(2):
        client.ask("What moved?", [STREAM], max_new_tokens=3, timeout_s=60)
    # Worker counters reach the router's registry on the next telemetry poll.
    wait_for(
        lambda: metric(service.metrics_url, "mosaic_frames_ingested_total", stream=STREAM) >= 10,
        what="worker counters in /metrics",
    )
    yield before
    client.delete_stream(STREAM)


def test_every_specified_family_is_exposed_with_its_type(service, activity):
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(service.metrics_url))}
    # prometheus_client also exposes a ``*_created`` timestamp per counter and histogram; not part of the spec.
    mosaic = {n: kind for n, kind in families.items() if n.startswith("mosaic_") and not n.endswith("_created")}
    assert mosaic == SPEC


def test_values_follow_what_the_service_did(service, activity):
    url = service.metrics_url
    assert metric(url, "mosaic_frames_received_total", stream=STREAM) == 10
    assert metric(url, "mosaic_frames_ingested_total", stream=STREAM) == 10
    assert metric(url, "mosaic_frames_dropped_total", stream=STREAM) == 0
    assert metric(url, "mosaic_queries_total", outcome="ok") >= activity["ok"] + 2
    assert metric(url, "mosaic_time_to_first_token_seconds_count", mode="cluster") >= activity["ttft"] + 2
    assert metric(url, "mosaic_inter_token_latency_seconds_count", mode="cluster") >= 4  # 2 gaps per 3-token answer
    assert (metric(url, "mosaic_workers_up"), metric(url, "mosaic_workers_starting")) == (2, 0)
    for part in ("ingest", "questions"):  # 10 frames went through engine.ingest, and questions were answered
        wait_for(lambda p=part: metric(url, "mosaic_engine_loop_seconds_total", part=p) > 0, timeout_s=10, what=part)
    assert metric(url, "mosaic_active_streams") >= 1
    assert metric(url, "mosaic_ingest_latency_seconds_count") >= 10
    for worker in ("0", "1"):
        assert metric(url, "mosaic_tier_capacity_bytes", worker=worker, tier="device") == 2 * MIB
        assert 0.0 <= metric(url, "mosaic_cluster_device_hit_ratio", worker=worker) <= 1.0
    # Gauges from the engine's stats, refreshed every half second and polled from the workers: they may trail.
    wait_for(lambda: metric(url, "mosaic_tier_used_bytes", tier="device") > 0, timeout_s=10, what="device bytes used")
    wait_for(lambda: metric(url, "mosaic_clusters") >= 1, timeout_s=10, what="the stream's clusters in /metrics")


def test_promtool_accepts_the_exposition(service, activity):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian: apt-get install prometheus)")
    text = scrape(service.metrics_url)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
