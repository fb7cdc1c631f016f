"""Helpers shared by the service end-to-end tests (frames from sample clips, waiting, scraping)."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mosaic_core.model.video import iter_video_frames, sample_clip_path

API_KEY = "e2e-api-key"
NAMESPACE = "e2e"


def connect(service, *, api_key: str | None = None):
    """A ``MosaicClient`` to the session server over TLS (trusting its self-signed certificate)."""
    from pathlib import Path

    from services.client import MosaicClient

    return MosaicClient(service.target, api_key=api_key, root_certificates=Path(service.tls_ca_path).read_bytes())


def clip_frames(name: str, *, fps: float, num_frames: int, offset_s: float = 0.0, step: int = 1):
    """``(timestamp_s, rgb)`` of a sample clip, looping, shifted by ``offset_s``; every ``step``-th pixel."""
    frames = iter_video_frames(sample_clip_path(name), fps=fps, loop=True, max_frames=num_frames)
    return [(offset_s + f.timestamp_s, f.rgb[::step, ::step]) for f in frames]


def wait_for(predicate, *, timeout_s: float = 120.0, interval_s: float = 0.2, what: str = "condition"):
    """Polls ``predicate`` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def wait_ingested(client, stream_id: str, num_frames: int, timeout_s: float = 120.0):
    return wait_for(
        lambda: (s := client.get_stream(stream_id)).stats.frames_ingested >= num_frames and s,
        timeout_s=timeout_s,
        what=f"{num_frames} frames of {stream_id} to be ingested",
    )


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted label items): value}`` of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(url: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, items), v in samples(scrape(url)).items() if n == name and want <= set(items))


def wait_started(worker, *, timeout_s: float = 400.0) -> None:
    """Waits until a worker actor's start is done, asking its ``start_state`` as the router does."""
    import ray

    from services.worker_actor import start_state_call

    def ready():
        state = ray.get(start_state_call(worker).remote(), timeout=timeout_s)
        assert state.error is None, state.text
        return state.ready

    wait_for(ready, timeout_s=timeout_s, what="the worker's start")
