"""The real /metrics endpoint: scraped over HTTP, parsed, and linted by promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import MosaicMetrics


def scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


@pytest.fixture
def server_and_metrics():
    metrics = MosaicMetrics()
    metrics.prime(worker_ids=("0", "1"))
    server = metrics.start_http_server(0, addr="127.0.0.1")
    yield server, metrics
    server.close()


def test_http_scrape_parses_and_tracks_updates(server_and_metrics) -> None:
    server, metrics = server_and_metrics
    content_type, text = scrape(server.port)
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"mosaic_frames_received", "mosaic_time_to_first_token_seconds", "mosaic_workers_up"} <= names
    metrics.streams.frame_received("cam-1", 7)
    metrics.observe_ttft("cluster", 0.025)
    _, text = scrape(server.port)
    assert 'mosaic_frames_received_total{stream="cam-1"} 7.0' in text
    assert 'mosaic_time_to_first_token_seconds_count{mode="cluster"} 1.0' in text


def test_close_frees_the_port(server_and_metrics) -> None:
    server, _ = server_and_metrics
    port = server.port
    server.close()
    with pytest.raises(OSError):
        scrape(port)
    server.close()  # idempotent: the fixture closes it again


def test_promtool_accepts_the_exposition(server_and_metrics) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found on PATH (Debian: apt-get install prometheus)")
    server, metrics = server_and_metrics
    metrics.streams.frame_received("cam-1")
    metrics.streams.frame_dropped("cam-1", "queue_full")
    metrics.observe_ingest_latency(0, 0.1)
    metrics.memory.set_tier(1, "device", 10, 100, 1)
    _, text = scrape(server.port)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
