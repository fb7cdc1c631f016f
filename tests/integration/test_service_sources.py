"""Server-side sources with real PyAV: sampling, looping, pacing, and reconnecting with backoff, decoded by the
reader's thread or by a child process (``services.source_decoding``)."""

from __future__ import annotations

import io
import itertools
import math
import socket
import threading
import time

import av
import numpy as np
import pytest
from http_pages import serving

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model.geometry import downscaled_size
from mosaic_core.model.video import iter_video_frames, probe_video, sample_clip_path
from services.source_decoding import iter_frames_in_child
from services.sources import SourceReader, SourceState

in_child_or_not = pytest.mark.parametrize("decode_in_child", [False, True], ids=["thread", "child"])


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


@in_child_or_not
def test_file_source_samples_at_fps_and_ends(decode_in_child):
    clip = sample_clip_path("carphone_pristine.mp4")
    settings = {"url": clip, "fps": 2.0, "realtime": False, "decode_in_child": decode_in_child}
    reader, frames = _collect(settings, until=lambda f: False, timeout_s=5)
    deadline = time.monotonic() + 20
    while reader.progress().state is not SourceState.ENDED and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = reader.progress()
    info = probe_video(clip)
    last_frame_s = info.duration_s - 1.0 / info.native_fps
    assert progress.state is SourceState.ENDED
    assert progress.frames_read == len(frames) == math.floor(last_frame_s * 2) + 1  # instants 0, 0.5, 1.0, ...
    assert all(b - a >= 0.5 - 1e-6 for a, b in itertools.pairwise(frames))


@in_child_or_not
def test_looping_file_source_continues_its_clock_and_is_paced_in_real_time(decode_in_child):
    clip = sample_clip_path("carphone_pristine.mp4")  # about 4 s long
    started = time.monotonic()
    settings = {"url": clip, "fps": 4.0, "loop": True, "decode_in_child": decode_in_child}
    reader, frames = _collect(settings, until=lambda f: len(f) >= 20)
    elapsed_s = time.monotonic() - started
    reader.stop()
    assert len(frames) >= 20 and frames == sorted(frames) and frames[-1] > 4.0  # past the end: it looped
    assert elapsed_s >= frames[19] - 0.5, "frames must not arrive faster than the stream's clock"
    assert reader.progress().state is SourceState.RUNNING


def test_unreachable_camera_reconnects_with_backoff():
    with socket.socket() as sock:  # a port with nothing listening: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reader = SourceReader(
        f"rtsp://127.0.0.1:{port}/cam", fps=1.0, sink=lambda t, rgb: None, backoff_s=0.05, blocked_networks=()
    ).start()
    time.sleep(1.5)
    progress = reader.progress()
    reader.stop()
    assert progress.state in (SourceState.ERROR, SourceState.CONNECTING)
    assert "Cannot open" in progress.error or progress.state is SourceState.CONNECTING
    # Backoff doubles (0.05, 0.1, 0.2, 0.4, 0.8 s): a handful of attempts in 1.5 s, not hundreds.
    assert 2 <= progress.num_reconnects <= 8


@in_child_or_not
def test_missing_file_is_an_error_without_retries(decode_in_child):
    reader = SourceReader(
        "/no/such/clip.mp4", fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, decode_in_child=decode_in_child
    ).start()
    deadline = time.monotonic() + 10
    while reader.progress().state is not SourceState.ERROR and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # time enough for a retry, were there one
    progress = reader.progress()
    assert progress.state is SourceState.ERROR and "Cannot open" in progress.error
    assert progress.num_reconnects == 0


def test_a_child_decodes_the_same_frames_and_raises_the_same_errors():
    clip = sample_clip_path("bikes.mp4")
    expected = list(itertools.islice(iter_video_frames(clip, fps=2.0, start_offset_s=3.0), 5))
    decoded = list(itertools.islice(iter_frames_in_child(clip, fps=2.0, loop=False, start_offset_s=3.0), 5))
    assert [f.timestamp_s for f in decoded] == [f.timestamp_s for f in expected]
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(decoded, expected, strict=True))
    assert decoded[0].rgb.flags.writeable
    with pytest.raises(InvalidArgumentError) as in_thread:
        next(iter_video_frames("/no/such/clip.mp4", fps=1.0))
    with pytest.raises(InvalidArgumentError) as in_child:
        next(iter_frames_in_child("/no/such/clip.mp4", fps=1.0, loop=False, start_offset_s=0.0))
    assert str(in_child.value) == str(in_thread.value)


@in_child_or_not
def test_a_reader_with_a_pixel_cap_hands_on_720p_frames_scaled_down(decode_in_child):
    """What the worker's readers do by default (``ServiceConfig.decode_oversample``): the picture is scaled down as
    it is decoded, in the child when there is one, and the sink gets the smaller frame."""
    clip, cap = sample_clip_path("bigbuckbunny.mp4"), 401_408  # 1280 x 720
    sizes, done = [], threading.Event()

    def sink(timestamp_s, rgb) -> None:
        sizes.append(rgb.shape)
        if len(sizes) >= 2:
            done.set()

    settings = {"fps": 1.0, "realtime": False, "decode_in_child": decode_in_child, "max_pixels": cap}
    reader = SourceReader(clip, sink=sink, **settings).start()
    try:
        assert done.wait(30), f"the reader handed on {len(sizes)} frames in 30 s"
    finally:
        reader.stop()
    assert set(sizes) == {(*downscaled_size(720, 1280, cap), 3)}
    in_child = next(iter_frames_in_child(clip, fps=1.0, loop=False, start_offset_s=0.0, max_pixels=cap))
    assert np.array_equal(in_child.rgb, next(iter_video_frames(clip, fps=1.0, max_pixels=cap)).rgb)


def test_a_child_stops_when_asked_while_the_reader_waits():
    stop = threading.Event()
    frames = iter_frames_in_child(sample_clip_path("bikes.mp4"), fps=1.0, loop=True, start_offset_s=0.0, stop=stop)
    assert next(frames).timestamp_s == 0.0
    stop.set()
    started = time.monotonic()
    assert list(frames) == []  # at most one more frame's wait, then it ends without an error
    assert time.monotonic() - started < 2.0


def _mpegts_clip(num_frames: int) -> bytes:
    """``num_frames`` of 25-fps MPEG-TS whose timestamps start at 0, as an encoder writes after each (re)start."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 250, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def test_a_network_source_whose_timestamps_restart_keeps_delivering_frames():
    """A camera's encoder restarted 10 s into one HTTP response: its timestamps start at 0 again. The frames after
    the restart are sampled on one clock, not skipped until the new timestamps pass the old ones."""
    with serving(_mpegts_clip(250) + _mpegts_clip(250), "video/mp2t") as camera:
        reader, frames = _collect(
            {"url": f"{camera}/live.ts", "fps": 1.0, "realtime": False, "blocked_networks": ()},
            until=lambda f: len(f) >= 20,
            timeout_s=15.0,
        )
        reader.stop()
    assert frames == [float(k) for k in range(20)], f"20 s of video at 1 fps gave {len(frames)} frames: {frames}"


@pytest.mark.parametrize(("image_format", "path"), [("JPEG", "/snapshot.cgi"), ("PNG", "/snapshot.png")])
def test_a_cameras_snapshot_over_http_is_read(image_format, path):
    """A camera's snapshot URL is one picture; the container whitelist for HTTP (which keeps playlists out) reads it."""
    from PIL import Image

    picture = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(picture, format=image_format)
    with serving(picture.getvalue()) as camera:
        frame = next(iter_video_frames(f"{camera}{path}", fps=1.0))
    assert frame.rgb.shape == (48, 64, 3) and abs(int(frame.rgb.mean()) - 200) <= 3
