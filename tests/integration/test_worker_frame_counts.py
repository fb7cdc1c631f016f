"""Every frame offered to a worker is counted where it went: a source reader's frames are all received, and a push
says accepted only for the frames it queued (real worker and engine in-process, tiny model on the CPU, no Ray)."""

from __future__ import annotations

import os
import time

import numpy as np

from mosaic_core.engine.engine import Engine
from mosaic_core.model.video import sample_clip_path
from services.config import load_config
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.sources import SourceState
from services.worker import WorkerCore


def _worker(tiny_model, tmp_path, **overrides) -> WorkerCore:
    config = load_config(
        None, data_dir=str(tmp_path / "data"), ingest_headroom=0.0, engine={"target_tokens_per_frame": 16}, **overrides
    )
    return WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)


def test_every_frame_a_source_reader_samples_is_received(tiny_model, tmp_path):
    """A 29.97-fps clip read at 29 fps: its frames are closer together than 0.95 of the stream's interval, where the
    queue's own grid used to refuse some the reader had already sampled, counting them nowhere."""
    clip = sample_clip_path("carphone_pristine.mp4")
    worker = _worker(tiny_model, tmp_path, source_roots=[os.path.dirname(clip)], ingest_queue_frames=256)
    try:
        worker.open_stream(StreamRecord(stream_id="cam", fps=29.0, source_url=clip))
        source = worker.sessions["cam"].source
        deadline = time.monotonic() + 30
        while source.progress().state is not SourceState.ENDED:
            assert time.monotonic() < deadline, source.progress()
            time.sleep(0.05)
        read = source.progress().frames_read
        assert read > 100
        received = worker.telemetry.totals("cam").received
        assert received == read, f"{read - received} of the {read} frames the reader sampled were counted nowhere"
    finally:
        worker.shutdown()


def test_a_push_counts_accepted_only_the_frames_it_queued(tiny_model, tmp_path):
    """PushFrames' frames_accepted means "queued for ingest", as GetStream's frames_received; a frame sampled out to
    the stream's fps is counted apart, neither accepted nor rejected."""
    worker = _worker(tiny_model, tmp_path)
    try:
        worker.open_stream(StreamRecord(stream_id="cam", fps=1.0))
        rgb = np.zeros((32, 32, 3), np.uint8)
        # 5 frames within one second of a 1-fps stream: the first is kept, four are sampled out
        result = worker.push([(i, "cam", 100.0 + i * 0.1, rgb) for i in range(5)])
        assert (result.accepted, result.dropped, result.rejected, result.sampled_out) == (1, 0, [], 4)
        assert worker.telemetry.totals("cam").received == result.accepted
    finally:
        worker.shutdown()
