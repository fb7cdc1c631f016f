"""Server-side sources with real PyAV: sampling, looping, pacing, and reconnecting with backoff."""

from __future__ import annotations

import itertools
import math
import socket
import threading
import time

from mosaic_core.model.video import probe_video, sample_clip_path
from services.sources import SourceReader, SourceState


def _collect(reader_kwargs: dict, *, until, timeout_s: float = 30.0):
    frames: list[float] = []
    done = threading.Event()

    def sink(timestamp_s, rgb) -> None:
        assert rgb.ndim == 3 and rgb.shape[2] == 3
        frames.append(timestamp_s)
        if until(frames):
            done.set()

    reader = SourceReader(sink=sink, **reader_kwargs).start()
    done.wait(timeout_s)
    return reader, frames


def test_file_source_samples_at_fps_and_ends():
    clip = sample_clip_path("carphone_pristine.mp4")
    reader, frames = _collect({"url": clip, "fps": 2.0, "realtime": False}, until=lambda f: False, timeout_s=5)
    deadline = time.monotonic() + 20
    while reader.progress().state is not SourceState.ENDED and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = reader.progress()
    info = probe_video(clip)
    last_frame_s = info.duration_s - 1.0 / info.native_fps
    assert progress.state is SourceState.ENDED
    assert progress.frames_read == len(frames) == math.floor(last_frame_s * 2) + 1  # instants 0, 0.5, 1.0, ...
    assert all(b - a >= 0.5 - 1e-6 for a, b in itertools.pairwise(frames))


def test_looping_file_source_continues_its_clock_and_is_paced_in_real_time():
    clip = sample_clip_path("carphone_pristine.mp4")  # about 4 s long
    started = time.monotonic()
    reader, frames = _collect({"url": clip, "fps": 4.0, "loop": True}, until=lambda f: len(f) >= 20)
    elapsed_s = time.monotonic() - started
    reader.stop()
    assert len(frames) >= 20 and frames == sorted(frames) and frames[-1] > 4.0  # past the end: it looped
    assert elapsed_s >= frames[19] - 0.5, "frames must not arrive faster than the stream's clock"
    assert reader.progress().state is SourceState.RUNNING


def test_unreachable_camera_reconnects_with_backoff():
    with socket.socket() as sock:  # a port with nothing listening: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reader = SourceReader(f"rtsp://127.0.0.1:{port}/cam", fps=1.0, sink=lambda t, rgb: None, backoff_s=0.05).start()
    time.sleep(1.5)
    progress = reader.progress()
    reader.stop()
    assert progress.state in (SourceState.ERROR, SourceState.CONNECTING)
    assert "Cannot open" in progress.error or progress.state is SourceState.CONNECTING
    # Backoff doubles (0.05, 0.1, 0.2, 0.4, 0.8 s): a handful of attempts in 1.5 s, not hundreds.
    assert 2 <= progress.num_reconnects <= 8


def test_missing_file_is_an_error_without_retries():
    reader = SourceReader("/no/such/clip.mp4", fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01).start()
    time.sleep(0.5)
    progress = reader.progress()
    assert progress.state is SourceState.ERROR and "Cannot open" in progress.error
    assert progress.num_reconnects == 0
