"""Backpressure: a flooding client fills a bounded queue, drops are counted, memory stays bounded, and a full
question queue or too many PushFrames calls answer RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from service_support import API_KEY, clip_frames, metric, wait_for, wait_ingested

from services.client import frame_message
from services.gen.mosaic.v1 import mosaic_pb2 as pb

QUEUE_FRAMES = 32  # the session server's ingest_queue_frames
METADATA = (("x-api-key", API_KEY),)


def _raw_frames(stream_id: str, num_frames: int, *, height: int = 480, width: int = 640):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        rgb = np.roll(base, i, axis=1)
        raw = pb.RawFrame(rgb=rgb.tobytes(), height=height, width=width, channels=3)
        yield pb.Frame(stream_id=stream_id, timestamp_s=i / 50, raw=raw)  # 50 fps: every frame has its slot


def _worker_rss(service, stream_id: str) -> int:
    import ray

    coordinator = service.server.coordinator
    worker = coordinator.workers[coordinator.placement[stream_id]]
    return ray.get(worker.info.remote(), timeout=30).rss_bytes


def test_flooding_client_fills_the_queue_drops_oldest_counts_and_stays_bounded(client, service):
    stream_id = "bp-flood"
    client.create_stream(stream_id, fps=50.0)  # no sampling (the fps cap is 60): every frame reaches the queue
    try:
        rss_before = _worker_rss(service, stream_id)
        num_frames = 300  # 300 x 0.9 MB raw frames: about 280 MB if nothing were dropped
        response = client.push_frames(_raw_frames(stream_id, num_frames), timeout_s=300)
        assert response.frames_accepted == num_frames and response.frames_rejected == 0
        assert response.frames_dropped > 0
        stats = client.get_stream(stream_id).stats
        assert stats.ingest_queue_frames <= QUEUE_FRAMES
        assert stats.frames_dropped == response.frames_dropped
        assert stats.frames_received == num_frames
        growth = _worker_rss(service, stream_id) - rss_before
        assert growth < 120 * 2**20, f"worker memory grew by {growth / 2**20:.0f} MiB under the flood"
        wait_for(
            lambda: (
                metric(service.metrics_url, "mosaic_frames_dropped_total", stream=stream_id, reason="queue_full")
                == response.frames_dropped
            ),
            what="drop counter",
        )
        # The queue drains and the stream keeps ingesting the newest frames.
        wait_for(lambda: client.get_stream(stream_id).stats.ingest_queue_frames == 0, what="queue to drain")
        final = client.get_stream(stream_id).stats
        assert final.frames_ingested + final.frames_dropped == num_frames
    finally:
        client.delete_stream(stream_id)


@pytest.fixture
def question_stream(client):
    stream_id = "bp-questions"
    client.create_stream(stream_id, fps=2.0)
    client.push_frames((stream_id, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=6))
    wait_ingested(client, stream_id, 6)
    yield stream_id
    client.delete_stream(stream_id)


def test_full_question_queue_is_resource_exhausted_with_a_retry_hint(client, service, question_stream):
    request = pb.QueryRequest(stream_ids=[question_stream], question="Describe everything.", max_new_tokens=300)
    rejected_before = metric(service.metrics_url, "mosaic_queries_total", outcome="rejected")
    # Five long questions start at once: two run (query_concurrency), three wait (query_queue_size).
    long_calls = [client.stub.Query(request, timeout=120, metadata=METADATA) for _ in range(5)]
    try:
        wait_for(lambda: metric(service.metrics_url, "mosaic_query_queue_depth") == 3, what="3 waiting questions")
        with pytest.raises(grpc.RpcError) as info:
            list(client.stub.Query(request, timeout=30, metadata=METADATA))
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.details() and "retry in about" in err.details()
        hint = dict(err.trailing_metadata())["retry-after-ms"]
        assert int(hint) > 0
        assert metric(service.metrics_url, "mosaic_queries_total", outcome="rejected") == rejected_before + 1
    finally:
        for call in long_calls:
            call.cancel()  # cancelled questions free their slots and stop on the workers
    wait_for(lambda: metric(service.metrics_url, "mosaic_query_queue_depth") == 0, what="queue to empty")
    answer = client.ask("Still answering?", [question_stream], max_new_tokens=2, timeout_s=60)
    assert len(answer.token_ids) == 2


def test_too_many_push_calls_are_resource_exhausted(client, service, question_stream):
    release = threading.Event()

    def held_frames():
        release.wait(60)  # the call stays open, sending nothing, until released
        yield from ()

    held = [client.stub.PushFrames.future(held_frames(), timeout=120, metadata=METADATA) for _ in range(3)]
    try:
        time.sleep(1.0)  # the three calls are open on the server
        with pytest.raises(grpc.RpcError) as info:
            client.push_frames([frame_message(question_stream, 200.0, np.zeros((32, 32, 3), np.uint8))])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
    finally:
        release.set()
    assert [f.result(60).frames_accepted for f in held] == [0, 0, 0]  # the held calls end normally
    # Room again; the timestamp follows the stream's clock (a wild jump ahead would be refused on its own).
    client.push_frames([frame_message(question_stream, 30.0, np.zeros((32, 32, 3), np.uint8))])
