"""A pulled local file goes on from its position after a crash: its history holds the file once, in order.

A restarted worker read a file that was not yet read to its end again from its start, under later timestamps: the
stream's history held the same video twice. It now resumes after the newest frame of its sealed clusters, what a
crash leaves; the frames after it that were in the ingest queue or the engine's window are read again, at the times
the stream had given them (an answer's evidence or a watch event may cite one), and the frames after those on the
clock as it goes on.

Real in-process workers (no Ray) on a real data directory, reading a real clip. The crash is the first worker's data
directory copied while its engine thread is held (frames queued, not ingested) and its writers have written what it
handed them.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np

from mosaic_core.durable.manifest import read_state, replay
from mosaic_core.engine.engine import Engine
from mosaic_core.model.video import iter_video_frames, sample_clip_path
from services import worker as worker_module
from services.config import load_config
from services.metadata import StreamRecord
from services.metadata.memory import InMemoryMetadataStore
from services.source_resume import FILE_OFFSETS, SOURCE_LAST_OFFERED, file_position_s
from services.sources import SourceState
from services.worker import WorkerCore

CLIP = "bikes.mp4"  # 10 s at 25 fps: sampled at 6 fps, frames late by an uneven part of a frame
FPS = 6.0


def _config(data_dir):
    clips = os.path.dirname(sample_clip_path(CLIP))
    engine = {"target_tokens_per_frame": 16, "local_window_tokens": 32, "formation": {"max_tokens": 32}}
    return load_config(None, data_dir=str(data_dir), source_roots=[clips], engine=engine)


def _worker(tiny_model, config) -> WorkerCore:
    engine = Engine(tiny_model, config.engine_config(worker_subdir="w0"))
    return WorkerCore("0", config, store=InMemoryMetadataStore(), engine=engine).wait_started(60)


def _wait(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(0.01)
    return value


def _frame_times(stream_dir) -> list[float]:
    """Every frame time of the stream's sealed clusters, in order."""
    return sorted(t for entry in replay(stream_dir).clusters.values() for t in entry.frame_timestamps_s)


def test_a_pulled_file_restarted_after_a_crash_goes_on_from_its_position(tiny_model, tmp_path):
    file_times = [f.timestamp_s for f in iter_video_frames(sample_clip_path(CLIP), fps=FPS)]
    record = StreamRecord(stream_id="yard", fps=FPS, source_url=sample_clip_path(CLIP))

    first = _worker(tiny_model, _config(tmp_path / "before"))
    gate = threading.Event()
    try:
        first.open_stream(record)
        store = first.engine.history.store
        stream_dir = store.stream_dir("yard")
        _wait(lambda: len(_frame_times(stream_dir)) >= 4, "4 frames in sealed clusters")
        first.loop.post(gate.wait, 60)  # from here nothing is ingested: what the reader reads is queued
        session = first.sessions["yard"]
        queued_from_s = session.last_offered_s
        _wait(lambda: session.last_offered_s >= queued_from_s + 2 / FPS, "2 frames queued behind the held engine")
        assert store.flush(30)
        shutil.copytree(tmp_path / "before", tmp_path / "after")  # the disk as a crash now leaves it
        sealed = _frame_times(stream_dir)
        given_out_s = read_state(stream_dir).get("last_timestamp_s")
        read_before_s = session.last_offered_s
    finally:
        gate.set()
        first.shutdown()
    assert sealed == file_times[: len(sealed)]  # the first reader stamps the file's own times
    assert read_before_s > sealed[-1] + 1.5 / FPS  # frames read then were lost with the crash: they must come again
    assert len(sealed) < len(file_times) - 4

    second = _worker(tiny_model, _config(tmp_path / "after"))
    try:
        assert second.restored_streams == ["yard"]
        source = second.sessions["yard"].source
        _wait(lambda: source.progress().state is SourceState.ENDED, "the file read to its end", 60)
        _wait(lambda: second.queues.depth("yard") == 0, "the queue drained")
        second.loop.call(lambda: None)  # the engine thread took up the last frames queued before it ran this
        segments = read_state(second.engine.history.store.stream_dir("yard")).get(FILE_OFFSETS)
    finally:
        second.shutdown()  # a graceful stop: every frame ingested goes into a sealed cluster, on disk

    history = _frame_times(tmp_path / "after" / "w0" / "yard")
    assert history[: len(sealed)] == sealed
    # The file once: every frame after the sealed ones, none twice, none left out.
    assert len(history) == len(file_times), (len(history), len(file_times), len(sealed))
    assert np.all(np.diff(history) > 0)
    # The frames the first worker had given out, ingested but in no sealed cluster, have the times they had: the
    # time of the newest one is a frame time of the history again.
    assert given_out_s > sealed[-1]
    assert given_out_s in history
    last_given_out_s, offset_s = segments[-1]
    assert last_given_out_s >= given_out_s
    num_kept = sum(t <= last_given_out_s for t in file_times)
    assert history[:num_kept] == file_times[:num_kept]
    # The frames after them at the offset its state keeps for a later restart, after every time given out.
    assert history[num_kept] > last_given_out_s
    np.testing.assert_allclose(np.array(history[num_kept:]) - file_times[num_kept:], offset_s, atol=1e-6)


def _crash_when(worker: WorkerCore, ready, data_dir, copy_dir) -> tuple[list[float], float]:
    """Once ``ready()``, holds ``worker``'s engine thread until its source queued 2 more frames, and copies its data
    directory as a crash then leaves it; returns the stream's sealed frame times and the newest frame time it had given
    out (ingested) then."""
    stream_dir = worker.engine.history.store.stream_dir("yard")
    gate = threading.Event()
    try:
        _wait(ready, "the stream to come so far", 60)
        worker.loop.post(gate.wait, 60)  # from here nothing is ingested: what the reader reads is queued
        session = worker.sessions["yard"]
        queued_from_s = session.last_offered_s
        _wait(lambda: session.last_offered_s >= queued_from_s + 2 / FPS, "2 frames queued behind the held engine")
        assert worker.engine.history.store.flush(30)
        shutil.copytree(data_dir, copy_dir)
        return _frame_times(stream_dir), read_state(stream_dir)["last_timestamp_s"]
    finally:
        gate.set()
        worker.shutdown()


def test_a_second_crash_after_frames_took_their_times_back_still_finds_each_frames_file_time(tiny_model, tmp_path):
    file_times = [f.timestamp_s for f in iter_video_frames(sample_clip_path(CLIP), fps=FPS)]
    first = _worker(tiny_model, _config(tmp_path / "0"))
    first.open_stream(StreamRecord(stream_id="yard", fps=FPS, source_url=sample_clip_path(CLIP)))
    stream_dir = first.engine.history.store.stream_dir("yard")
    _, given_out_s = _crash_when(first, lambda: len(_frame_times(stream_dir)) >= 4, tmp_path / "0", tmp_path / "1")

    second = _worker(tiny_model, _config(tmp_path / "1"))
    last_given_out_s = read_state(second.engine.history.store.stream_dir("yard"))[FILE_OFFSETS][-1][0]
    stream = second.engine.streams["yard"]
    # Crashed again once frames past those given out before are in, on the clock as it went on after the restart.
    sealed, given_out_again_s = _crash_when(
        second, lambda: (stream.last_timestamp_s or 0.0) > last_given_out_s, tmp_path / "1", tmp_path / "2"
    )
    assert given_out_again_s > max(sealed[-1], last_given_out_s)

    third = _worker(tiny_model, _config(tmp_path / "2"))
    try:
        source = third.sessions["yard"].source
        _wait(lambda: source.progress().state is SourceState.ENDED, "the file read to its end", 60)
        _wait(lambda: third.queues.depth("yard") == 0, "the queue drained")
        third.loop.call(lambda: None)
        segments = read_state(third.engine.history.store.stream_dir("yard"))[FILE_OFFSETS]
    finally:
        third.shutdown()
    history = _frame_times(tmp_path / "2" / "w0" / "yard")
    assert len(history) == len(file_times) and np.all(np.diff(history) > 0)
    assert history[: len(sealed)] == sealed
    assert given_out_s in history and given_out_again_s in history  # each crash's frames given out, at their times
    # The segments saved find the file time of every frame read after the last crash, whichever reader stamped it.
    positions = [file_position_s(segments, t) for t in history[len(sealed) :]]
    np.testing.assert_allclose(positions, file_times[len(sealed) :], atol=1e-6)


def test_a_file_whose_last_frames_a_stop_dropped_reads_them_after_its_restart(tiny_model, tmp_path, monkeypatch):
    """A file read to its end stayed ended at a restart, even when the frames its source queued last were dropped at
    the stop (still queued when its 2 s of ingest ran out): they were in no history, and never read again."""
    clip = "carphone_pristine.mp4"  # 4.004 s
    fps = 4.0
    file_times = [f.timestamp_s for f in iter_video_frames(sample_clip_path(clip), fps=fps)]
    monkeypatch.setattr(worker_module, "SHUTDOWN_INGEST_S", 0.0)  # a stop ingests nothing more of what is queued
    config = _config(tmp_path)
    first = _worker(tiny_model, config)
    gate = threading.Event()
    try:
        first.open_stream(StreamRecord(stream_id="dock", fps=fps, source_url=sample_clip_path(clip)))
        source = first.sessions["dock"].source
        _wait(lambda: first.telemetry.totals("dock").ingested >= 2, "2 frames ingested")
        first.loop.post(gate.wait, 60)
        _wait(lambda: source.progress().state is SourceState.ENDED, "the file read to its end")
        stopping = threading.Thread(target=first.shutdown)
        stopping.start()
        time.sleep(0.5)  # its checkpoint queued behind the held engine thread, which runs it before any ingest
    finally:
        gate.set()
    stopping.join(60)
    stream_dir = tmp_path / "w0" / "dock"
    state = read_state(stream_dir)
    assert state["source_ended"] and state[SOURCE_LAST_OFFERED] == file_times[-1]
    assert _frame_times(stream_dir)[-1] < file_times[-1]  # the last frames were dropped at the stop

    second = _worker(tiny_model, config)
    try:
        source = second.sessions["dock"].source
        _wait(lambda: source.progress().state is SourceState.ENDED, "the file read to its end", 60)
        assert source.progress().frames_read > 0
        _wait(lambda: second.queues.depth("dock") == 0, "the queue drained")
        second.loop.call(lambda: None)
    finally:
        second.shutdown()
    history = _frame_times(stream_dir)
    assert len(history) == len(file_times), (history, file_times)
    assert np.all(np.diff(history) > 0)
