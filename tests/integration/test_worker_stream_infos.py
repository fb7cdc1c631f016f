"""ListStreams on a worker: every stream's info comes from one engine-thread command (real worker, no Ray)."""

from __future__ import annotations

import sys
import time

import pytest

from mosaic_core.engine.engine import Engine
from services.config import load_config
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.worker import WorkerCore

FPS = 2.0


@pytest.fixture
def worker(tiny_model, tmp_path):
    config = load_config(None, data_dir=str(tmp_path / "history"), ingest_headroom=0.0, ingest_queue_frames=64)
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    yield worker
    worker.shutdown()


def test_stream_infos_asks_the_engine_thread_once_for_every_stream(worker, bikes_frames):
    for stream_id in ("c", "a", "b"):
        worker.open_stream(StreamRecord(stream_id=stream_id, fps=FPS))
    frames = [(0, "a", i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:4])]
    assert worker.push(frames).accepted == 4
    deadline = time.monotonic() + 60
    while worker.telemetry.totals("a").ingested < 4:
        assert time.monotonic() < deadline, "frames were not ingested"
        time.sleep(0.05)
    commands = []
    call = worker.loop.call

    def counting_call(fn, *args, **kwargs):
        commands.append(fn)
        return call(fn, *args, **kwargs)

    worker.loop.call = counting_call  # counts the engine-thread commands stream_infos sends
    infos = worker.stream_infos()
    assert len(commands) == 1  # not one per stream, each behind an ingest pass
    assert [i.record.stream_id for i in infos] == ["a", "b", "c"]
    assert [i.frames_ingested for i in infos] == [4, 0, 0]
    single = worker.stream_info("a")
    assert (infos[0].num_clusters, infos[0].bytes_by_tier) == (single.num_clusters, single.bytes_by_tier)


def test_the_worker_sets_its_process_s_switch_interval(tiny_model, tmp_path):
    before = sys.getswitchinterval()
    config = load_config(None, data_dir=str(tmp_path / "history"), python_switch_interval_s=0.0007)
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0007)
    finally:
        worker.shutdown()
        sys.setswitchinterval(before)
