"""A worker (in-process, no Ray) restarted on its data directory: a pulled source's clock goes on, a shutdown ingests
nothing after its checkpoint, and a full device budget at CreateStream is RESOURCE_EXHAUSTED with a sentence."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from mosaic_core.config import MIB
from mosaic_core.durable.manifest import MANIFEST_NAME, decode_line, encode_line
from mosaic_core.engine.engine import Engine
from mosaic_core.errors import CapacityError, InvalidArgumentError, OutOfRangeError
from mosaic_core.model.video import sample_clip_path
from services import worker as worker_module
from services.config import load_config
from services.metadata import StreamRecord
from services.metadata.memory import InMemoryMetadataStore
from services.metrics import MosaicMetrics
from services.telemetry import apply_delta
from services.worker import WorkerCore


def _worker(tiny_model, config, store) -> WorkerCore:
    return WorkerCore(
        "0", config, store=store, engine=Engine(tiny_model, config.engine_config(worker_subdir="w0"))
    ).wait_started(60)


def _crash_and_restart(first: WorkerCore, tiny_model, config, store) -> WorkerCore:
    """``first``'s history on disk, then its process dies (no shutdown), and a new worker starts on its directory."""
    assert first.engine.history.store.flush(30)
    first.loop.stop()
    first.publisher.stop()
    return _worker(tiny_model, config, store)


def _wait_ingested(worker: WorkerCore, stream_id: str, n: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.telemetry.totals(stream_id).ingested < n:
        assert time.monotonic() < deadline, f"{stream_id} did not ingest {n} frames in {timeout_s}s"
        time.sleep(0.1)


def test_a_pulled_source_resumes_after_its_last_recorded_frame(tiny_model, tmp_path):
    clips = os.path.dirname(sample_clip_path("bikes.mp4"))
    config = load_config(None, data_dir=str(tmp_path), source_roots=[clips], engine={"target_tokens_per_frame": 16})
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    record = StreamRecord(stream_id="gate", fps=4.0, source_url=sample_clip_path("bikes.mp4"), loop_source=True)
    first.open_stream(record)
    _wait_ingested(first, "gate", 6)
    first.sessions["gate"].source.stop()
    deadline = time.monotonic() + 30
    while first.queues.depth("gate"):  # let the queued frames in, so the clock below is the last one
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.loop.call(lambda: None)
    first.loop.call(lambda: None)
    last_s = first.engine.streams["gate"].last_timestamp_s
    second = _crash_and_restart(first, tiny_model, config, store)
    try:
        assert second.restored_streams == ["gate"]
        restored_last = second.engine.streams["gate"].last_timestamp_s
        assert restored_last == last_s
        _wait_ingested(second, "gate", second.telemetry.totals("gate").ingested + 3)
        newest = second.loop.call(lambda: second.engine.streams["gate"].last_timestamp_s)
        # The file restarts at 0, but the stream clock goes on past what was recorded before the crash.
        assert newest > last_s, (newest, last_s)
    finally:
        second.shutdown()


def test_a_question_after_a_restart_keeps_to_retention_before_the_stream_sends_again(
    tiny_model, bikes_frames, tmp_path
):
    config = load_config(None, data_dir=str(tmp_path), engine={"target_tokens_per_frame": 16})
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="yard", fps=1.0, retention_s=4.0))
    assert not first.push([(i, "yard", float(i), rgb) for i, (_, rgb) in enumerate(bikes_frames[:12])]).rejected
    _wait_ingested(first, "yard", 12)
    second = _crash_and_restart(first, tiny_model, config, store)
    try:
        assert second.restored_streams == ["yard"]
        # the newest frame recorded is at 11 s, so 4 s of retention keeps 7 s to 11 s: 0 s to 2 s is gone
        with pytest.raises(
            OutOfRangeError, match=r"outside stream 'yard''s retention \(the last 4s: 7.000s to 11.000s"
        ):
            list(second.ask("old", "yard", "what happened?", 2, (0.0, 2.0), 60.0))
        answer = list(second.ask("kept", "yard", "what happened?", 2, (8.0, 11.0), 60.0))[-1]
        assert len(answer.token_ids) == 2  # what retention keeps is answered
    finally:
        second.shutdown()


def test_a_full_device_budget_is_resource_exhausted(tiny_model, tmp_path):
    config = load_config(
        None,
        data_dir=str(tmp_path),
        device_budget_bytes=1 * MIB,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    worker = _worker(tiny_model, config, InMemoryMetadataStore())
    try:
        opened = 0
        with pytest.raises(CapacityError, match="cannot take stream") as refused:
            for n in range(64):
                worker.open_stream(StreamRecord(stream_id=f"cam-{n}", fps=1.0))
                opened += 1
        assert opened > 0 and refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        assert f"cam-{opened}" not in worker.sessions
    finally:
        worker.shutdown()


def test_a_worker_refuses_streams_beyond_what_it_has_measured(tiny_model, bikes_frames, tmp_path):
    config = load_config(None, data_dir=str(tmp_path), ingest_headroom=0.8, engine={"target_tokens_per_frame": 16})
    worker = _worker(tiny_model, config, InMemoryMetadataStore())
    try:
        worker.open_stream(StreamRecord(stream_id="cam-0", fps=1.0))
        frames = [(i, "cam-0", float(i), rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])]
        assert not worker.push(frames).rejected
        _wait_ingested(worker, "cam-0", 8)
        measured = worker.loop.ingest_calls.capacity.frames_per_s()
        assert measured is not None and measured > 0
        with pytest.raises(CapacityError, match="would not be kept real-time"):
            worker.open_stream(StreamRecord(stream_id="cam-fast", fps=min(1000.0, 2 * measured)))
        assert "cam-fast" not in worker.sessions
    finally:
        worker.shutdown()


@pytest.mark.parametrize("ingest_s", [0.0, 30.0])
def test_a_shutdown_ingests_nothing_after_its_checkpoint(tiny_model, bikes_frames, tmp_path, monkeypatch, ingest_s):
    """Frames queued at a shutdown go in before the checkpoint, or are counted dropped (reason shutdown): the history
    on disk then covers every frame the stream's state says it ingested. The shutdown hands those counts to the
    router's metrics too, as no telemetry poll takes them after it."""
    monkeypatch.setattr(worker_module, "SHUTDOWN_INGEST_S", ingest_s)
    config = load_config(None, data_dir=str(tmp_path), engine={"target_tokens_per_frame": 16})
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="cam", fps=1.0))
    gate = threading.Event()
    first.loop.post(gate.wait, 30)  # the engine thread waits here while the frames are queued and the shutdown asked
    assert not first.push([(i, "cam", float(i), rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])]).rejected
    threading.Timer(0.3, gate.set).start()
    last = first.shutdown()
    totals = first.telemetry.totals("cam")
    assert (totals.ingested, totals.dropped) == ((0, 8) if ingest_s == 0 else (8, 0))
    metrics = MosaicMetrics()
    apply_delta(metrics, last, open_streams={"cam"})
    counted = [
        metrics.registry.get_sample_value(name, labels) or 0  # a counter never counted has no series
        for name, labels in (
            ("mosaic_frames_ingested_total", {"stream": "cam"}),
            ("mosaic_frames_dropped_total", {"stream": "cam", "reason": "shutdown"}),
        )
    ]
    assert counted == [totals.ingested, totals.dropped]

    second = _worker(tiny_model, config, store)
    try:
        restored = second.engine.streams["cam"]
        assert second.telemetry.totals("cam").dropped == totals.dropped
        if ingest_s == 0:
            assert restored.last_timestamp_s is None and not second.engine.clusters("cam")
        else:
            assert restored.last_timestamp_s == 7.0
            assert max(c.end_s for c in second.engine.clusters("cam")) >= 7.0
    finally:
        second.shutdown()


def test_a_stored_source_no_longer_allowed_fails_only_its_stream(tiny_model, bikes_frames, tmp_path, caplog):
    """The clip under a source root was removed (or the config narrowed) while the worker was down: the worker comes
    back with every stream, and that one's source is in ERROR with the reason, where GetStream shows it."""
    root = tmp_path / "clips"
    root.mkdir()
    clip = root / "cam.mp4"
    clip.write_bytes(Path(sample_clip_path("bikes.mp4")).read_bytes())
    config = load_config(
        None, data_dir=str(tmp_path / "data"), source_roots=[str(root)], engine={"target_tokens_per_frame": 16}
    )
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="pushed", fps=1.0))
    first.open_stream(StreamRecord(stream_id="gate", fps=4.0, source_url=str(clip), loop_source=True))
    assert not first.push([(0, "pushed", 1.0, bikes_frames[0][1])]).rejected
    _wait_ingested(first, "pushed", 1)
    first.shutdown()
    clip.unlink()

    with caplog.at_level(logging.INFO, logger="services.worker_streams"):
        second = _worker(tiny_model, config, store)
    try:
        assert sorted(second.restored_streams) == ["gate", "pushed"]
        assert re.search(r"worker 0 restored 2 streams in [\d.]+ s and serves them, 1 of them not pulled ", caplog.text)
        progress = second.sessions["gate"].source.progress()
        assert progress.state.name == "ERROR" and "no longer opened here" in progress.error, progress
        assert not second.push([(0, "pushed", 2.0, bikes_frames[1][1])]).rejected
        _wait_ingested(second, "pushed", second.telemetry.totals("pushed").ingested + 1)
    finally:
        second.shutdown()


def test_a_stored_record_the_worker_no_longer_accepts_is_kept_on_disk_and_shown_unserved(tiny_model, tmp_path, caplog):
    """A stream whose stored record this version refuses (a field a newer release wrote) is not served, its folder
    kept: the worker's telemetry carries it to the router's gauge of unserved streams, as long as it lives."""
    config = load_config(None, data_dir=str(tmp_path), engine={"target_tokens_per_frame": 16})
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    for stream_id in ("kept", "newer"):
        first.open_stream(StreamRecord(stream_id=stream_id, fps=1.0))
    first.shutdown()
    journal = tmp_path / "w0" / "newer" / MANIFEST_NAME
    lines = [decode_line(line) for line in journal.read_bytes().splitlines(True)]
    for line in lines:
        if line["op"] == "open":
            line["stream"]["meta"]["field_of_a_newer_release"] = 1
    journal.write_bytes(b"".join(encode_line(line) for line in lines))

    with caplog.at_level(logging.INFO, logger="services.worker_streams"):
        second = _worker(tiny_model, config, store)
    try:
        assert second.restored_streams == ["kept"] and journal.exists()
        assert "refuses their stored records: 1" in caplog.text and "worker 0 restored 1 stream in " in caplog.text
        metrics = MosaicMetrics()
        for _ in range(2):  # a gauge: the second drain says it again
            apply_delta(metrics, second.drain_telemetry(), open_streams={"kept"})
            unserved = {
                reason: metrics.registry.get_sample_value(
                    "mosaic_durable_unserved_streams", {"worker": "0", "reason": reason}
                )
                for reason in ("no_room", "record_refused")
            }
            assert unserved == {"no_room": 0, "record_refused": 1}
            restored = metrics.registry.get_sample_value("mosaic_durable_restored_streams", {"worker": "0"})
            restore_s = metrics.registry.get_sample_value("mosaic_durable_restore_seconds", {"worker": "0"})
            assert restored == 1 and 0 < restore_s < 60
    finally:
        second.shutdown()


def test_a_worker_with_many_live_cameras_stops_their_sources_at_once(tiny_model, tmp_path, monkeypatch):
    """Each reader notices a stop within its decoder's poll (0.2 s): stopped one after another, 150 cameras took
    about 15 s, past the 10 s the router gives a worker to stop before it is killed, checkpoint undone."""
    fake_child = tmp_path / "decode-child.sh"
    fake_child.write_text("#!/bin/sh\nexec sleep 600\n")  # a live camera whose next frame has not come yet
    fake_child.chmod(0o755)
    config = load_config(None, data_dir=str(tmp_path / "data"), engine={"target_tokens_per_frame": 16})
    worker = _worker(tiny_model, config, InMemoryMetadataStore())
    monkeypatch.setattr(sys, "executable", str(fake_child))
    for n in range(40):  # opened at different times, so their polls are spread over the 0.2 s
        worker.open_stream(StreamRecord(stream_id=f"cam-{n}", fps=1.0, source_url=f"rtsp://cam-{n}.invalid/live"))
        time.sleep(0.02 * ((n * 7) % 10))
    time.sleep(1.0)
    started_s = time.monotonic()
    worker.shutdown()
    took_s = time.monotonic() - started_s
    assert took_s < 2.0, f"shutting down a worker with 40 live cameras took {took_s:.2f} s"


def test_after_a_crash_a_stream_never_shows_fewer_frames_received_than_ingested(tiny_model, bikes_frames, tmp_path):
    """The counters are saved at each telemetry drain, the frames ingested come from the journal, which may be
    ahead of them at a crash; GetStream must not say a camera sent fewer frames than the engine took."""
    config = load_config(
        None, data_dir=str(tmp_path), ingest_headroom=0.0, ingest_queue_frames=64,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "formation": {"max_tokens": 32}},
    )  # fmt: skip
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="cam", fps=2.0))
    frames = [(i / 2.0, rgb) for i, (_, rgb) in enumerate(bikes_frames[:20])]
    first.push([(i, "cam", t, rgb) for i, (t, rgb) in enumerate(frames[:4])])
    _wait_ingested(first, "cam", 4)
    first.drain_telemetry()  # saves the counters: 4 received
    first.push([(i, "cam", t, rgb) for i, (t, rgb) in enumerate(frames[4:], start=4)])
    _wait_ingested(first, "cam", 20)
    assert first.engine.history.store.flush(30)
    first.loop.stop()  # the process dies before its next drain
    first.publisher.stop()

    second = _worker(tiny_model, config, store)
    try:
        info = second.stream_info("cam")
        assert info.frames_ingested > 4  # the journal had more than the saved counters
        assert info.frames_received >= info.frames_ingested
    finally:
        second.shutdown()


def test_a_clip_read_to_its_end_is_not_read_again_after_a_restart(tiny_model, tmp_path):
    """A file source that ended stays ENDED across a restart once its frames are in sealed clusters: read again, it
    came back as new history with later timestamps, at every restart. A crash loses the frames still in the window
    (docs/durability.md); those, and only those, are read again."""
    from mosaic_core.durable.manifest import replay
    from mosaic_core.model.video import iter_video_frames
    from services.sources import SourceState

    clip = sample_clip_path("carphone_pristine.mp4")
    engine = {"target_tokens_per_frame": 16, "local_window_tokens": 32, "formation": {"max_tokens": 32}}
    config = load_config(None, data_dir=str(tmp_path), source_roots=[os.path.dirname(clip)], engine=engine)
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="clip", fps=2.0, source_url=clip))
    deadline = time.monotonic() + 60
    while first.sessions["clip"].source.progress().state is not SourceState.ENDED:  # 4 s of clip, paced
        assert time.monotonic() < deadline, first.sessions["clip"].source.progress()
        time.sleep(0.1)
    _wait_ingested(first, "clip", first.sessions["clip"].source.progress().frames_read)
    first.drain_telemetry()  # what the router's poll does every few seconds: the stream's state is saved
    second = _crash_and_restart(first, tiny_model, config, store)
    stream_dir = second.engine.history.store.stream_dir("clip")
    try:
        sealed = [t for e in replay(stream_dir).clusters.values() for t in e.frame_timestamps_s]
        file_times = [f.timestamp_s for f in iter_video_frames(clip, fps=2.0)]
        lost = [t for t in file_times if t > max(sealed, default=-1.0)]
        assert second.restored_streams == ["clip"] and sealed and lost  # the window's frames were lost
        source = second.sessions["clip"].source
        while source.progress().state is not SourceState.ENDED:
            assert time.monotonic() < deadline, source.progress()
            time.sleep(0.1)
        assert source.progress().frames_read == len(lost)
    finally:
        second.shutdown()  # a graceful stop: every frame ingested is in a sealed cluster
    third = _worker(tiny_model, config, store)
    try:
        assert third.sessions["clip"].source.progress().state is SourceState.ENDED
        ingested = third.telemetry.totals("clip").ingested
        time.sleep(1.5)  # three frames' time at 2 fps, were it read again
        assert third.sessions["clip"].source.progress().frames_read == 0
        assert third.telemetry.totals("clip").ingested == ingested
        assert third.queues.depth("clip") == 0
        history = sorted(t for e in replay(stream_dir).clusters.values() for t in e.frame_timestamps_s)
        assert len(history) == len(file_times) and history[: len(sealed)] == sealed  # the clip once; the lost frames
        assert history == file_times  # came again at the times the stream had given them
    finally:
        third.shutdown()


def test_frames_the_router_could_not_decode_stay_counted_after_a_restart(tiny_model, tmp_path):
    """What the router asks of the stream's worker for an undecodable JPEG (``WorkerCore.count_dropped``) counts it
    in the worker's totals (GetStream's frames_dropped), in the telemetry the metric comes from, and across a
    restart. Before, the router kept the count itself, and a new router process started it again at 0."""
    config = load_config(None, data_dir=str(tmp_path), engine={"target_tokens_per_frame": 16})
    store = InMemoryMetadataStore()
    first = _worker(tiny_model, config, store)
    first.open_stream(StreamRecord(stream_id="cam", fps=1.0))
    for _ in range(3):
        first.count_dropped("cam", "decode_error")
    first.count_dropped("elsewhere", "decode_error")  # not open here: nothing counted, nothing raised
    with pytest.raises(InvalidArgumentError, match="unknown drop reason"):
        first.count_dropped("cam", "bad jpeg")
    assert first.stream_info("cam").frames_dropped == 3
    assert first.drain_telemetry().dropped == {("cam", "decode_error"): 3}
    first.shutdown()

    second = _worker(tiny_model, config, store)
    try:
        assert second.stream_info("cam").frames_dropped == 3
    finally:
        second.shutdown()


def test_history_no_configured_worker_would_serve_stops_a_worker_from_starting(tiny_model, bikes_frames, tmp_path):
    """Scaled down (Helm: fewer worker pods), a deployment keeps the history of the workers it no longer runs in the
    data folder they share: none of its workers restores it, so those cameras would be gone from ListStreams, with
    no metric and no log line. ``mosaic serve``'s preflight refuses this only for workers on its own machine (a
    router joined to a Ray cluster does not mount their folders), so the workers refuse it themselves."""
    from mosaic_core.errors import ConfigError

    engine = {"target_tokens_per_frame": 16}
    two = load_config(None, data_dir=str(tmp_path), workers=2, ray_address="auto", engine=engine)
    store = InMemoryMetadataStore()
    second = WorkerCore(
        "1", two, store=store, engine=Engine(tiny_model, two.engine_config(worker_subdir="worker-1"))
    ).wait_started(60)
    second.open_stream(StreamRecord(stream_id="gate", fps=1.0))
    assert not second.push([(0, "gate", 1.0, bikes_frames[0][1])]).rejected
    _wait_ingested(second, "gate", 1)
    second.shutdown()

    one = load_config(None, data_dir=str(tmp_path), workers=1, ray_address="auto", engine=engine)
    with pytest.raises(ConfigError, match=r"camera history of worker-1.*--workers 2"):
        WorkerCore("0", one, store=store, engine=Engine(tiny_model, one.engine_config(worker_subdir="worker-0")))
