"""A CreateStream whose engine open outlasts its wait fails, and the open, when it ends, is undone: the stream exists
nowhere, and a retry creates it (real worker and engine in-process, tiny model on the CPU, no Ray)."""

from __future__ import annotations

import time

import pytest

from mosaic_core.engine.engine import Engine
from services import worker_streams
from services.config import load_config
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.worker import WorkerCore


def test_an_open_that_ends_after_its_create_gave_up_is_undone(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_streams, "OPEN_STREAM_WAIT_S", 0.2)
    config = load_config(None, data_dir=str(tmp_path / "data"), ingest_headroom=0.0)
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    open_stream = worker.engine.open_stream

    def slow_open(*args, **kwargs):  # started at once, ends after the wait: a slow volume, say
        time.sleep(1.0)
        return open_stream(*args, **kwargs)

    record = StreamRecord(stream_id="cam", fps=1.0)
    try:
        worker.engine.open_stream = slow_open
        with pytest.raises(TimeoutError, match="did not finish"):
            worker.open_stream(record)
        worker.loop.call(lambda: None, timeout_s=10)  # the late open and what follows it have run
        assert "cam" not in worker.engine.streams
        assert worker.stream_ids() == [] and worker.stream_infos() == []

        worker.engine.open_stream = open_stream
        monkeypatch.setattr(worker_streams, "OPEN_STREAM_WAIT_S", 30.0)  # a loaded machine's open may take 0.2 s
        worker.open_stream(record)  # the client's retry
        assert worker.stream_info("cam").record.stream_id == "cam"
    finally:
        worker.shutdown()
