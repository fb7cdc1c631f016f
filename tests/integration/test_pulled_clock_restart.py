"""A pulled stream whose worker died before its first frame was ingested goes on with its source's clock.

A pulled source's clock reads 0 at its first frame, and the worker maps it to the wall clock from then on
(``clock_epoch_unix``: evidence times, watches' active hours). A worker restarted after that frame was read, but before
it was ingested, started the clock at 0 again while keeping the old mapping: its frames were stamped as if the outage
had not happened, on timestamps the first worker had already given out.

Real in-process workers (no Ray) on a real data directory, reading a real clip. The first worker's engine thread is held
from the moment the stream is open, so that nothing of it is ingested; the crash is its data directory copied as it is
on disk then.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

from mosaic_core.durable.manifest import read_state
from mosaic_core.engine.engine import Engine
from mosaic_core.model.video import sample_clip_path
from services.config import load_config
from services.metadata import StreamRecord
from services.metadata.memory import InMemoryMetadataStore
from services.worker import WorkerCore

CLIP = "bikes.mp4"
FPS = 4.0
OUTAGE_S = 2.0  # the wall clock, and so a pulled source's clock, moves on this far while no worker runs


def _config(data_dir):
    clips = os.path.dirname(sample_clip_path(CLIP))
    return load_config(None, data_dir=str(data_dir), source_roots=[clips], engine={"target_tokens_per_frame": 16})


def _worker(tiny_model, config) -> WorkerCore:
    engine = Engine(tiny_model, config.engine_config(worker_subdir="w0"))
    return WorkerCore("0", config, store=InMemoryMetadataStore(), engine=engine).wait_started(60)


def _record() -> StreamRecord:
    return StreamRecord(stream_id="gate", fps=FPS, source_url=sample_clip_path(CLIP), loop_source=True)


def _open_held(worker: WorkerCore) -> threading.Event:
    """Opens the pulled stream with the engine thread held from right after the open until the event is set (or 60 s
    pass): the open runs as one engine-thread command that queues the hold, and the engine thread runs the commands
    queued while it ran one before it ingests anything."""
    gate = threading.Event()

    def open_then_hold() -> None:
        worker.open_stream(_record())  # on the engine thread, its engine calls run in place
        worker.loop.post(gate.wait, 60)

    worker.loop.call(open_then_hold)
    return gate


def _wait(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(0.01)
    return value


def test_a_pulled_stream_restarted_before_its_first_ingest_goes_on_with_its_clock(tiny_model, tmp_path):
    first = _worker(tiny_model, _config(tmp_path / "before"))
    gate = _open_held(first)
    try:
        session = first.sessions["gate"]
        _wait(lambda: session.last_offered_s is not None and session.last_offered_s > 0, "second frame queued")
        assert first.engine.history.store.flush(30)  # the clock's start on disk, however it gets there
        epoch_unix = read_state(first.engine.history.store.stream_dir("gate"))["clock_epoch_unix"]
        read_before_s = session.last_offered_s
        assert first.telemetry.totals("gate").ingested == 0
        shutil.copytree(tmp_path / "before", tmp_path / "after")  # the disk as a crash now leaves it
    finally:
        gate.set()
        first.shutdown()
    time.sleep(max(0.0, epoch_unix + read_before_s + OUTAGE_S - time.time()))

    started_unix = time.time()
    second = _worker(tiny_model, _config(tmp_path / "after"))
    try:
        assert second.restored_streams == ["gate"]
        assert second.sessions["gate"].clock_epoch_unix == epoch_unix
        _wait(lambda: second.telemetry.totals("gate").ingested >= 3, "3 frames ingested after the restart", 90)
        first_s = second.loop.call(second.engine.stream_stats, "gate").first_timestamp_s
        # The clock did not start again: the first frame after the restart is stamped past every frame read before
        # the crash, at the wall-clock time its clock had reached when the restarted worker read it.
        assert first_s > read_before_s + OUTAGE_S - 0.5, (first_s, read_before_s)
        assert started_unix - 0.5 <= epoch_unix + first_s <= time.time(), (epoch_unix + first_s, started_unix)
    finally:
        second.shutdown()


def test_where_a_pulled_sources_clock_started_is_on_disk_before_its_first_frame_is_queued(tiny_model, tmp_path):
    worker = _worker(tiny_model, _config(tmp_path))
    store = worker.engine.history.store
    interval_s = store.state_interval_s
    store.state_interval_s = time.monotonic() + 3600  # the writer's own passes write no state while this is set
    gate = _open_held(worker)
    try:
        _wait(lambda: worker.queues.depth("gate") >= 1, "frame queued")
        on_disk = read_state(store.stream_dir("gate")).get("clock_epoch_unix")
        assert on_disk is not None, "a crash now would lose where the source's clock started"
        assert on_disk == worker.sessions["gate"].clock_epoch_unix
    finally:
        store.state_interval_s = interval_s
        gate.set()
        worker.shutdown()
