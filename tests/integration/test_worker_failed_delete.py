"""A DeleteStream whose engine close fails (a disk error as the stream's numbers are retired; a full volume is not
one: the history then goes first, tests/engine/test_reopened_stream_ids.py) keeps the stream as it was, and its
retry deletes the history for good (real worker and engine in-process, tiny model on the CPU, no Ray)."""

from __future__ import annotations

import errno
import os
import threading
import time

import grpc
import pytest

from mosaic_core.durable import retired
from mosaic_core.engine.engine import Engine
from mosaic_core.model.video import sample_clip_path
from services.config import load_config
from services.errors import status_for
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.worker import WorkerCore

FPS = 2.0


def _disk_error(path, data) -> None:
    raise OSError(errno.EIO, "Input/output error", str(path))


def _wait_ingested(worker: WorkerCore, stream_id: str, n: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.stream_info(stream_id).frames_ingested < n:
        assert time.monotonic() < deadline, f"{stream_id} did not ingest {n} frames in {timeout_s}s"
        time.sleep(0.05)


def _config(tmp_path, **overrides):
    engine = {"target_tokens_per_frame": 16}
    return load_config(None, data_dir=str(tmp_path / "data"), ingest_headroom=0.0, engine=engine, **overrides)


def _worker(tiny_model, config) -> WorkerCore:
    return WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)


def test_a_failed_delete_keeps_the_stream_and_its_queued_frames_and_a_retry_deletes_its_history(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    config = _config(tmp_path, ingest_queue_frames=64)
    worker = _worker(tiny_model, config)
    try:
        worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
        frames = [(i, "cam", i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])]
        assert worker.push(frames[:4]).accepted == 4
        _wait_ingested(worker, "cam", 4)
        history_dir = os.path.join(config.engine_config().data_dir, "cam")
        assert os.path.isdir(history_dir)

        gate = threading.Event()
        worker.loop.post(gate.wait, 30)  # the engine thread waits: the frames pushed now are queued at the delete
        assert worker.push(frames[4:]).accepted == 4
        assert worker.queues.depth("cam") == 4
        monkeypatch.setattr(retired, "write_atomic", _disk_error)
        threading.Timer(0.5, gate.set).start()  # by then the delete's command waits behind the gate
        with pytest.raises(OSError) as failed:
            worker.close_stream("cam")
        assert failed.value.errno == errno.EIO
        assert status_for(failed.value).code is grpc.StatusCode.INTERNAL  # the client sees an error, not OK

        # The stream is as it was: listed, its queued frames ingested, new frames taken.
        assert worker.stream_ids() == ["cam"]
        _wait_ingested(worker, "cam", 8)
        later = [(0, "cam", 8 / FPS, bikes_frames[8][1])]
        assert worker.push(later).accepted == 1
        _wait_ingested(worker, "cam", 9)
        num_clusters = worker.stream_info("cam").num_clusters

        monkeypatch.undo()  # room on the volume again: the retry deletes it
        assert worker.close_stream("cam") == num_clusters
        assert worker.stream_ids() == []
        assert "cam" not in worker.engine.streams
    finally:
        worker.shutdown()
    assert not os.path.exists(history_dir)
    engine = Engine(tiny_model, config.engine_config())  # the next start
    try:
        assert engine.restore_streams() == []  # the deleted camera does not come back
    finally:
        engine.close()


def test_a_failed_delete_keeps_pulling_the_source_and_a_delete_stops_it(tiny_model, tmp_path, monkeypatch):
    clip = sample_clip_path("bikes.mp4")
    config = _config(tmp_path, source_roots=[os.path.dirname(clip)])
    worker = _worker(tiny_model, config)
    try:
        worker.open_stream(StreamRecord(stream_id="gate", fps=4.0, source_url=clip, loop_source=True))
        _wait_ingested(worker, "gate", 3)
        source = worker.sessions["gate"].source
        monkeypatch.setattr(retired, "write_atomic", _disk_error)
        with pytest.raises(OSError):
            worker.close_stream("gate")
        _wait_ingested(worker, "gate", worker.stream_info("gate").frames_ingested + 3)  # still pulled
        assert worker.sessions["gate"].source is source

        monkeypatch.undo()
        worker.close_stream("gate")
        assert worker.stream_ids() == []
        read = source.progress().frames_read
        time.sleep(0.5)
        assert source.progress().frames_read == read  # the reader stopped with the stream
    finally:
        worker.shutdown()


def test_an_answer_a_stuck_engine_thread_never_ends_gives_its_answer_thread_back(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """The engine loop ends an answer past its deadline itself; when the engine thread is stuck nothing does, and the
    ask waited on its events for good, holding one of the worker's answer threads."""
    from services import worker_questions
    from services.errors import DeadlineError

    monkeypatch.setattr(worker_questions, "ABANDON_AFTER_DEADLINE_S", 0.5)
    worker = _worker(tiny_model, _config(tmp_path))
    gate = threading.Event()
    try:
        worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
        assert worker.push([(i, "cam", i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:2])]).accepted == 2
        _wait_ingested(worker, "cam", 2)
        worker.loop.post(gate.wait, 60)  # the engine thread is stuck from here
        started = time.monotonic()
        with pytest.raises(DeadlineError) as given_up:
            list(worker.ask("q1", "cam", "what moved?", 4, None, timeout_s=0.5))
        assert time.monotonic() - started < 10.0, "the ask waited for the stuck engine thread"
        assert "given up" in str(given_up.value)
    finally:
        gate.set()
        worker.shutdown()
