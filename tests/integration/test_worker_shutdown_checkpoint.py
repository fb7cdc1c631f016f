"""A worker's shutdown waits for its checkpoint as long as the checkpoint itself may take, so a disk that fails it is
what the log names (real worker and engine in-process, tiny model on the CPU, a real filesystem fault, no Ray)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from mosaic_core.durable import write_behind as write_behind_module
from mosaic_core.engine import stream_lifecycle
from mosaic_core.engine.engine import Engine
from services import worker as worker_module
from services.config import load_config
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.worker import WorkerCore

# The bounds, scaled down: the checkpoint's own wait, the ingest window and the margin past them.
CHECKPOINT_WAIT_S = 1.0
INGEST_S = 0.5
MARGIN_S = 3.0
BUSY_S = 0.5  # the engine thread's step under way when the shutdown asks for the checkpoint


def _wait_ingested(worker: WorkerCore, stream_id: str, n: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.stream_info(stream_id).frames_ingested < n:
        assert time.monotonic() < deadline, f"{stream_id} did not ingest {n} frames in {timeout_s}s"
        time.sleep(0.05)


@pytest.fixture
def broken_disk_worker(tiny_model, bikes_frames, tmp_path, monkeypatch):
    """A worker whose stream's history cannot be written any more (a file where its folder was), with its engine
    thread busy for ``BUSY_S`` when the shutdown asks for the checkpoint; yields it and its stream's folder and the
    folder set aside, which a test puts back to fix the disk."""
    monkeypatch.setattr(stream_lifecycle, "CHECKPOINT_WAIT_S", CHECKPOINT_WAIT_S)
    monkeypatch.setattr(worker_module, "SHUTDOWN_INGEST_S", INGEST_S)
    monkeypatch.setattr(worker_module, "SHUTDOWN_MARGIN_S", MARGIN_S)
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.05,))
    config = load_config(None, data_dir=str(tmp_path), ingest_headroom=0.0, engine={"target_tokens_per_frame": 16})
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    worker.open_stream(StreamRecord(stream_id="cam", fps=2.0))
    assert not worker.push([(i, "cam", i / 2.0, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])]).rejected
    _wait_ingested(worker, "cam", 8)
    stream_dir = worker.engine.history.store.stream_dir("cam")
    aside = stream_dir.with_name("cam.aside")
    stream_dir.rename(aside)
    stream_dir.write_bytes(b"")  # a file where the stream's folder was: every write of its history fails
    gate = threading.Event()
    worker.loop.post(gate.wait, 30)
    threading.Timer(BUSY_S, gate.set).start()
    yield worker, stream_dir, aside
    if aside.exists():
        stream_dir.unlink()
        aside.rename(stream_dir)


def test_a_checkpoint_that_fails_at_its_own_limit_is_logged_with_the_disks_error(broken_disk_worker, caplog):
    worker, stream_dir, aside = broken_disk_worker

    def fix_the_disk_once_logged() -> None:  # the disk's error is what this test is after, not the close's wait
        deadline_s = time.monotonic() + 30.0
        while not _failure_lines(caplog) and time.monotonic() < deadline_s:
            time.sleep(0.05)
        stream_dir.unlink()
        aside.rename(stream_dir)

    fixer = threading.Thread(target=fix_the_disk_once_logged)
    started_s = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="services.worker"):
        fixer.start()
        worker.shutdown()
    elapsed_s = time.monotonic() - started_s
    fixer.join(30.0)

    [line] = _failure_lines(caplog)
    assert f"not all on disk after {CHECKPOINT_WAIT_S:g} s" in line and "NotADirectoryError" in line, line
    assert elapsed_s < worker_module.shutdown_wait_s() + 10.0  # the publisher and the stores after it


def test_a_shutdown_whose_checkpoint_failed_does_not_wait_the_writers_minute_again(broken_disk_worker, monkeypatch):
    worker, _, _ = broken_disk_worker
    monkeypatch.setattr(worker_module, "STORE_CLOSE_AFTER_FAILURE_S", 0.5)
    started_s = time.monotonic()
    worker.shutdown()  # the disk stays broken throughout

    # the checkpoint's bounds, the close's two waits of 0.5 s, and the publisher's: not DurableStore.close's 2 x 60 s
    assert time.monotonic() - started_s < worker_module.shutdown_wait_s() + 8.0


def _failure_lines(caplog) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if "checkpoint at shutdown failed" in r.getMessage()]
