"""One PushFrames call carries frames of streams on several workers: a worker that is gone costs only its own
streams' frames, each refused FAILED_PRECONDITION with a sentence (Ray will not restart it), and the others are
queued; a frame the router cannot
decode is counted by its stream's worker, and by the router's own metric where that worker is gone; a frame its
stream's worker will sample out is not decoded, and counted as if it were.

Real Ray: one worker actor over the tiny preset, and one killed for good (calls to it raise as they would for a
worker that died); the router's real ``Coordinator`` routes the frames.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from service_support import wait_started

from services import push_calls
from services.config import load_config
from services.coordinator import Coordinator
from services.frames import encode_image
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metadata import StreamRecord
from services.metrics import MosaicMetrics
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer
from services.worker_actor import worker_actor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def workers(ray_cluster, redis_server, tmp_path_factory):
    config = load_config(
        None,
        redis_url=redis_server.url,
        redis_namespace=f"routing-{uuid.uuid4().hex[:8]}",
        data_dir=str(tmp_path_factory.mktemp("routing-history")),
        worker_cpus=0.5,
        ingest_headroom=0.0,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    alive = worker_actor(config).remote("alive", config)
    wait_started(alive)
    ray.get(alive.open_stream.remote(StreamRecord(stream_id="healthy", fps=2.0)), timeout=60)
    gone = worker_actor(config).remote("gone", config)
    ray.kill(gone, no_restart=True)
    yield [alive, gone]
    ray.get(alive.shutdown.remote(), timeout=60)
    ray.kill(alive)


def test_a_gone_worker_costs_only_its_own_streams_frames(workers, bikes_frames):
    coordinator = Coordinator(workers, None, MosaicMetrics())
    coordinator.placement = {"healthy": 0, "orphan": 1}
    coordinator.started = True
    rgb = bikes_frames[0][1]
    frames = [(0, "orphan", 1.0, rgb), (1, "healthy", 1.0, rgb), (2, "orphan", 1.5, rgb), (3, "healthy", 1.5, rgb)]
    result = asyncio.run(coordinator.push(frames))
    assert result.accepted == 2
    assert [(r.index, r.stream_id) for r in result.rejected] == [(0, "orphan"), (2, "orphan")]
    assert all(r.code == "FAILED_PRECONDITION" and "worker 1 is gone for good" in r.reason for r in result.rejected), (
        result
    )


def test_an_undecodable_frame_is_counted_once_by_its_workers_total_or_else_by_the_router(workers, bikes_frames):
    """The stream's worker counts a frame the router could not decode (so the count outlives the router); where that
    worker is gone, the router's metric counts it instead, and a frame is never counted by both."""
    metrics = MosaicMetrics()
    coordinator = Coordinator(workers, None, metrics)
    coordinator.placement = {"healthy": 0, "orphan": 1}
    coordinator.started = True
    servicer = MosaicServicer(
        coordinator, QueryQueue(max_waiting=4, max_running=1), metrics, mode="cluster", default_max_new_tokens=8,
        max_push_calls=4,
    )  # fmt: skip
    height, width, _ = bikes_frames[0][1].shape
    good = pb.RawFrame(rgb=bikes_frames[0][1].tobytes(), height=height, width=width, channels=3)
    broken = b"\xff\xd8\xff\xe0" + b"\x13\x37" * 64  # a JPEG's first bytes, then nothing a decoder can read

    async def frames():
        yield pb.Frame(stream_id="orphan", timestamp_s=5.0, encoded=broken)
        yield pb.Frame(stream_id="healthy", timestamp_s=5.0, encoded=broken)
        yield pb.Frame(stream_id="healthy", timestamp_s=5.5, raw=good)  # one accepted: the call is not refused whole

    dropped_before = ray.get(workers[0].stream_info.remote("healthy"), timeout=60).frames_dropped
    reply = asyncio.run(servicer.PushFrames(frames(), None))
    assert reply.frames_accepted == 1 and len(reply.errors) == 2, reply

    def router_count(stream_id: str) -> float:
        labels = {"stream": stream_id, "reason": "decode_error"}
        return metrics.registry.get_sample_value("mosaic_frames_dropped_total", labels) or 0.0

    assert router_count("orphan") == 1.0, "the gone worker's frame was counted nowhere"
    assert router_count("healthy") == 0.0, "the router counted a frame its worker counts too"
    assert ray.get(workers[0].stream_info.remote("healthy"), timeout=60).frames_dropped == dropped_before + 1


def test_frames_sampled_out_are_not_decoded_and_are_counted_as_if_they_were(workers, bikes_frames, monkeypatch):
    """JPEGs at 30 frames/s into streams of 2 and 5 fps, in one PushFrames call with a repeated and an earlier
    timestamp: the answer's totals and errors are those of the same frames decoded and pushed one at a time (as the
    router pushed every frame before), and the router decoded only the frames kept or refused."""
    for stream_id, fps in [("paced-2", 2.0), ("paced-5", 5.0), ("decoded-2", 2.0), ("decoded-5", 5.0)]:
        ray.get(workers[0].open_stream.remote(StreamRecord(stream_id=stream_id, fps=fps)), timeout=60)
    metrics = MosaicMetrics()
    coordinator = Coordinator(workers, None, metrics)
    coordinator.placement = dict.fromkeys(["paced-2", "paced-5", "decoded-2", "decoded-5"], 0)
    coordinator.started = True
    servicer = MosaicServicer(
        coordinator, QueryQueue(max_waiting=4, max_running=1), metrics, mode="cluster", default_max_new_tokens=8,
        max_push_calls=4,
    )  # fmt: skip
    jpeg = encode_image(bikes_frames[0][1], "jpeg")
    pushed = [(fps, 20.0 + i / 30) for i in range(60) for fps in ("2", "5")]
    pushed[30:30] = [("2", pushed[29][1]), ("5", 20.1)]  # the frame before again, then one earlier than the last
    decoded_timestamps = []
    decode_frame = push_calls.decode_frame

    def counted_decode(frame, max_pixels):
        decoded_timestamps.append(frame.timestamp_s)
        return decode_frame(frame, max_pixels)

    monkeypatch.setattr(push_calls, "decode_frame", counted_decode)

    async def frames():
        for fps, timestamp_s in pushed:
            yield pb.Frame(stream_id=f"paced-{fps}", timestamp_s=timestamp_s, encoded=jpeg)

    reply = asyncio.run(servicer.PushFrames(frames(), None))

    async def push_decoded():
        rgb = decode_frame(pb.Frame(encoded=jpeg))
        parts = [await coordinator.push([(i, f"decoded-{fps}", t, rgb)]) for i, (fps, t) in enumerate(pushed)]
        return parts

    parts = asyncio.run(push_decoded())
    expected = (
        sum(p.accepted for p in parts),
        sum(p.dropped for p in parts),
        sum(p.sampled_out for p in parts),
        [(r.index, r.stream_id.replace("decoded", "paced"), r.reason.replace("decoded", "paced")) for p in parts
         for r in p.rejected],
    )  # fmt: skip
    errors = [(e.index, e.stream_id, e.reason) for e in reply.errors]
    assert (reply.frames_accepted, reply.frames_dropped, reply.frames_sampled_out, errors) == expected
    assert reply.frames_rejected == 2 and reply.frames_sampled_out > 100, reply
    assert len(decoded_timestamps) == reply.frames_accepted + reply.frames_rejected, "a sampled-out frame was decoded"
