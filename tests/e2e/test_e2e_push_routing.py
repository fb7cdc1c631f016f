"""One PushFrames call carries frames of streams on several workers: a worker that is gone costs only its own
streams' frames, each refused UNAVAILABLE with a sentence, and the others are queued.

Real Ray: one worker actor over the tiny preset, and one killed for good (calls to it raise as they would for a
worker that died); the router's real ``Coordinator`` routes the frames.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.config import load_config
from services.coordinator import Coordinator
from services.metadata import StreamRecord
from services.metrics import MosaicMetrics
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
    ray.get(alive.info.remote(), timeout=400)
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
    assert all(r.code == "UNAVAILABLE" and "worker 1 is unavailable" in r.reason for r in result.rejected), result
