"""One PushFrames call carries frames of streams on several workers: a worker that is gone costs only its own
streams' frames, each refused FAILED_PRECONDITION with a sentence (Ray will not restart it), and the others are
queued; a frame the router cannot
decode is counted by its stream's worker, and by the router's own metric where that worker is gone.

Real Ray: one worker actor over the tiny preset, and one killed for good (calls to it raise as they would for a
worker that died); the router's real ``Coordinator`` routes the frames.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from service_support import wait_started

from services.config import load_config
from services.coordinator import Coordinator
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
