"""Sources that cannot be abused: one allow-list check with one refusal sentence, and readers that give up.

Real PyAV, real sockets (a loopback port with nothing listening), real files under a temporary source root.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from source_runs import read_to_end

from mosaic_core.errors import ConfigError, InvalidArgumentError, TimestampOrderError
from mosaic_core.model.video import sample_clip_path
from services.source_policy import check_source_schemes, check_source_url
from services.sources import SourceReader, SourceState


@pytest.fixture
def root(tmp_path):
    """A source root holding one real clip, plus a file outside it and a symlink that points out of it."""
    inside = tmp_path / "clips"
    inside.mkdir()
    clip = inside / "cam.mp4"
    clip.write_bytes(Path(sample_clip_path("carphone_pristine.mp4")).read_bytes())
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(clip.read_bytes())
    os.symlink(outside, inside / "link.mp4")
    return inside


def _refusal_shape(message: str, url: str) -> str:
    return message.replace(repr(url), "<url>")


def test_every_refused_source_gets_the_same_sentence(root):
    refused = [
        "file:///etc/hostname",
        f"file://{root}/cam.mp4",
        "concat:/etc/hostname|/etc/hostname",
        "data:video/mp4;base64,AAAA",
        "tcp://127.0.0.1:9",
        "ftp://127.0.0.1/x.mp4",
        "udp://127.0.0.1:9",
        "rtmp://cam/live",
        "/etc/hostname",  # exists, outside the root
        "/no/such/clip.mp4",  # missing, outside the root
        str(root / "missing.mp4"),  # missing, under the root
        str(root / "link.mp4"),  # exists under the root, resolves outside it
        str(root / ".." / "secret.mp4"),  # exists, escapes with ..
        str(root),  # the root itself is a directory
        "clips/cam.mp4",  # relative
        "http:///no-host",
        "rtsp://cam/\x00x",
        "",
    ]
    shapes = set()
    for url in refused:
        with pytest.raises(InvalidArgumentError) as info:
            check_source_url(url, source_roots=[str(root)])
        shapes.add(_refusal_shape(str(info.value), url))
    assert len(shapes) == 1, shapes
    (shape,) = shapes
    assert "rtsp://" in shape and "https://" in shape and "source roots" in shape


def test_allowed_sources_pass_and_local_paths_resolve(root):
    assert check_source_url("rtsp://10.0.0.3/live") == "rtsp://10.0.0.3/live"
    assert check_source_url("HTTPS://cams.example/a.m3u8") == "HTTPS://cams.example/a.m3u8"
    assert check_source_url(str(root / "cam.mp4"), source_roots=[str(root)]) == os.path.realpath(root / "cam.mp4")
    # The router may not hold the files: it checks the path only.
    assert check_source_url(str(root / "later.mp4"), source_roots=[str(root)], must_exist=False)


def test_without_roots_no_local_file_is_allowed_and_the_sentence_says_so(root):
    with pytest.raises(InvalidArgumentError, match="no local files") as info:
        check_source_url(str(root / "cam.mp4"))
    with pytest.raises(InvalidArgumentError) as other:
        check_source_url("/no/such/clip.mp4")
    assert _refusal_shape(str(info.value), str(root / "cam.mp4")) == _refusal_shape(
        str(other.value), "/no/such/clip.mp4"
    )


def test_the_scheme_allow_list_is_configurable_and_checked():
    with pytest.raises(InvalidArgumentError):
        check_source_url("http://cam/a.mp4", allowed_schemes=["rtsp"])
    assert check_source_url("rtsp://cam/a", allowed_schemes=["rtsp"])
    with pytest.raises(ConfigError, match="ftp"):
        check_source_schemes(["rtsp", "ftp"])


def _stopped_once_its_error_says(reader: SourceReader, words: str, *, timeout_s: float) -> str:
    """Waits until the reader's error has ``words``, stops it, and returns its error."""
    deadline = time.monotonic() + timeout_s
    while words not in reader.progress().error:
        assert time.monotonic() < deadline, reader.progress()
        time.sleep(0.02)
    reader.stop()
    return reader.progress().error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_unreachable_source_ends_in_error_the_same_way_over_every_allowed_scheme(scheme, caplog):
    url = f"{scheme}://127.0.0.1:{_free_port()}/cam"
    caplog.set_level(logging.WARNING, logger="services.sources")
    reader = SourceReader(
        url, fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, max_failures=4, blocked_networks=()
    ).start()  # a loopback port with nothing behind it
    deadline = time.monotonic() + 20
    while reader.progress().state is not SourceState.ERROR or reader._thread.is_alive():
        assert time.monotonic() < deadline, reader.progress()
        time.sleep(0.02)
    progress = reader.progress()
    assert progress.num_reconnects == 3 and "4 attempts in a row failed" in progress.error
    assert "Cannot open" in progress.error
    records = [r for r in caplog.records if r.name == "services.sources"]
    assert len(records) == 2, [r.getMessage() for r in records]  # the first failure and the giving up
    assert all(r.exc_info is None for r in records)


@pytest.mark.parametrize("scheme", ["rtsp", "rtsps"])
def test_an_unreachable_camera_stays_in_error_and_is_tried_again_every_longest_back_off(scheme, caplog):
    """A camera that reboots comes back: a live source is not given up, and says how it goes on."""
    url = f"{scheme}://127.0.0.1:{_free_port()}/cam"
    caplog.set_level(logging.WARNING, logger="services.sources")
    reader = SourceReader(
        url, fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, max_backoff_s=0.05, max_failures=4,
        blocked_networks=(),
    ).start()  # fmt: skip
    deadline = time.monotonic() + 20
    while reader.progress().num_reconnects < 8:
        assert time.monotonic() < deadline, reader.progress()
        time.sleep(0.02)
    progress = reader.progress()
    reader.stop()
    assert progress.state is SourceState.ERROR and "Cannot open" in progress.error
    assert "attempts in a row failed, trying again every 0.05 s" in progress.error
    records = [r for r in caplog.records if r.name == "services.sources"]
    assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]


@pytest.fixture
def slow_dead_camera():
    """A loopback rtsp:// camera that takes every connection and hangs up 0.3 s later without a word: each attempt
    waits on it, as on a camera that does not answer, before it fails."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            stop.wait(0.3)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"rtsp://127.0.0.1:{server.getsockname()[1]}/cam"
    stop.set()
    thread.join(5)
    server.close()


def test_a_camera_that_keeps_failing_stays_in_error_while_it_is_tried_again(slow_dead_camera):
    """Every retry used to say CONNECTING while it waited on the dead camera, so GetStream's source_state and the
    worker's sources_failing (it counts ERROR) flapped."""
    reader = SourceReader(
        slow_dead_camera, fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, max_backoff_s=0.2, max_failures=2,
        blocked_networks=(),
    ).start()  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "attempts in a row failed" not in reader.progress().error:
            assert time.monotonic() < deadline, reader.progress()
            time.sleep(0.02)
        tried = reader.progress().num_reconnects
        states = []
        for _ in range(150):  # 1.5 s: three more attempts of 0.3 s, each after a back-off of 0.2 s
            states.append(reader.progress().state)
            time.sleep(0.01)
        assert reader.progress().num_reconnects >= tried + 2, "the camera was not tried again"
    finally:
        reader.stop()
    assert set(states) == {SourceState.ERROR}, f"CONNECTING in {states.count(SourceState.CONNECTING)} of 150 samples"


def test_a_source_whose_frames_keep_being_refused_stops_in_error_with_bounded_logs(caplog):
    caplog.set_level(logging.WARNING, logger="services.sources")

    def sink(timestamp_s, rgb):
        raise TimestampOrderError(f"timestamp {timestamp_s:.3f}s is not after the previous frame's 1000000.000s")

    clip = sample_clip_path("carphone_pristine.mp4")
    reader = SourceReader(clip, fps=30.0, sink=sink, loop=True, realtime=False, max_refused_frames=50).start()
    reader._thread.join(30)
    progress = reader.progress()
    assert not reader._thread.is_alive()
    assert progress.state is SourceState.ERROR and progress.frames_read == 50
    assert "50 frames in a row were refused" in progress.error and "1000000.000s" in progress.error
    records = [r for r in caplog.records if r.name == "services.sources"]
    assert len(records) == 2 and all(r.exc_info is None for r in records), [r.getMessage() for r in records]


@pytest.mark.parametrize("decode_in_child", [False, True])
def test_a_camera_password_stays_out_of_logs_errors_and_the_decoders_arguments(decode_in_child, caplog, monkeypatch):
    """A process's arguments are seen by every user of the host, and logs by whoever reads the pod's: a camera URL's
    password reaches neither, nor the source's error (GetStream shows it)."""
    import subprocess

    launched: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(args, *rest, **kwargs):
        launched.append(list(args))
        return real_popen(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    url = f"rtsp://admin:hunter2@127.0.0.1:{_free_port()}/cam"
    caplog.set_level(logging.DEBUG, logger="services.sources")
    reader = SourceReader(
        url, fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, max_failures=2, decode_in_child=decode_in_child,
        blocked_networks=(),
    ).start()  # fmt: skip
    error = _stopped_once_its_error_says(reader, "attempts in a row failed", timeout_s=30)
    assert "Cannot open" in error and "hunter2" not in error, error
    assert "rtsp://***@127.0.0.1" in error
    logged = [r.getMessage() for r in caplog.records]
    assert logged and not [line for line in logged if "hunter2" in line], logged
    assert len(launched) == (2 if decode_in_child else 0)
    assert not [args for args in launched if any("hunter2" in a for a in args)], launched


def test_a_refused_source_url_is_named_without_its_password():
    """The refusal goes back to the caller, and at a restart into the worker's log and the stream's source error."""
    with pytest.raises(InvalidArgumentError) as refused:
        check_source_url("rtsp://admin:hunter2@10.0.0.5/live", allowed_schemes=("https",))
    assert "hunter2" not in str(refused.value) and "'rtsp://***@10.0.0.5/live'" in str(refused.value)


class _ScriptedCamera(SourceReader):
    """The reconnect loop over scripted connections (the network and the decoder stand aside): each connection
    reads its number of frames and then drops. Records the delays the loop waits before each reconnect."""

    def __init__(self, frames_per_connection: list[int], **kwargs) -> None:
        super().__init__("rtsp://10.0.0.9/live", fps=1.0, sink=lambda t, rgb: None, blocked_networks=(), **kwargs)
        self.script = list(frames_per_connection)
        self.delays: list[float] = []
        wait = self._stop.wait
        self._stop.wait = lambda timeout=None: self.delays.append(timeout) or wait(0)

    def _read_once(self) -> bool:
        if not self.script:
            self._stop.set()
            return False
        for _ in range(self.script.pop(0)):
            with self._lock:
                self._progress.frames_read += 1
        raise OSError("the camera dropped the connection")


def test_a_connection_that_read_frames_starts_the_back_off_again():
    """A camera that drops once a day waited the longest back-off after every drop once a few had added up."""
    camera = _ScriptedCamera([0, 0, 0, 0, 20, 20, 20], backoff_s=0.1, max_backoff_s=3.2, max_failures=50).start()
    camera._thread.join(10)
    # the last is the wait after the script ran out, which stops the reader
    assert camera.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.1, 0.1, 0.1, 0.1])


def test_a_password_the_error_quotes_escaped_stays_out_of_it(caplog):
    """FFmpeg's errors quote the URL as Python's repr, which doubles a backslash: that form is hidden too."""
    url = f"rtsp://admin:pa\\ss@127.0.0.1:{_free_port()}/cam"
    reader = SourceReader(url, fps=1.0, sink=lambda t, rgb: None, backoff_s=0.01, max_failures=1, blocked_networks=())
    error = _stopped_once_its_error_says(reader.start(), "Cannot open", timeout_s=20)
    assert "pa\\" not in error and "rtsp://***@127.0.0.1" in error, error


def test_a_live_cameras_clock_jump_does_not_stop_its_reading(monkeypatch):
    """Frames of a live camera come in real time whatever their timestamps say: a jump of 600 s ahead is not waited
    for (the reader would leave the socket unread, reporting RUNNING), the pace starts again from it."""
    import services.sources as sources
    from mosaic_core.model.video import SampledFrame

    def camera(url, **sampling):  # a frame every 20 ms, its clock 600 s ahead from the sixth on
        for i in range(10):
            time.sleep(0.02)
            yield SampledFrame(sampling["start_offset_s"] + i * 0.02 + (600.0 if i >= 5 else 0.0), np.zeros((2, 2, 3)))

    monkeypatch.setattr(sources, "iter_video_frames", camera)
    got = []
    reader = SourceReader("rtsp://10.0.0.9/live", fps=50.0, sink=lambda t, rgb: got.append(t), blocked_networks=())
    reader.start()
    deadline = time.monotonic() + 5
    while len(got) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    reader.stop()
    assert len(got) == 10, got


@pytest.mark.parametrize("url", ["rtsp://10.0.0.9/live", "http://10.0.0.9/video.mjpg"])
def test_a_camera_back_from_an_outage_stamps_its_frames_by_the_wall_clock(monkeypatch, url):
    """The worker maps a pulled stream's clock to the wall by the time of its first frame (clock_epoch_unix: watches'
    active hours, evidence times). A reconnect went on from the last frame, so every frame after an outage was
    stamped the outage's length behind the wall, where a restart re-aligns the clock (services.worker_streams)."""
    import services.sources as sources
    from mosaic_core.model.video import SampledFrame

    connections = []

    def camera(url, **sampling):  # three frames at 10 fps, then the first connection drops for a back-off of 1 s
        connections.append(sampling["start_offset_s"])
        for k in range(3):
            yield SampledFrame(sampling["start_offset_s"] + k / 10, np.zeros((2, 2, 3), np.uint8))
        if len(connections) == 1:
            raise OSError("connection reset by peer")

    monkeypatch.setattr(sources, "iter_video_frames", camera)
    seen: list[tuple[float, float]] = []  # (wall clock, timestamp)
    reader = SourceReader(
        url, fps=10.0, sink=lambda t, rgb: seen.append((time.time(), t)), backoff_s=1.0,
        blocked_networks=(),
    ).start()  # fmt: skip
    deadline = time.monotonic() + 10
    while len(seen) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    reader.stop()
    assert len(seen) >= 6 and len(connections) >= 2, (seen, connections)
    epoch = seen[0][0] - seen[0][1]  # as FrameIntake.offer sets clock_epoch_unix at the first frame
    lags_s = [round(wall - (epoch + t), 2) for wall, t in seen]
    assert max(lags_s) < 0.5, f"frames after the outage are stamped behind the wall clock: {lags_s}"
    assert [t for _, t in seen] == sorted({t for _, t in seen})  # and the clock still increases


@pytest.mark.parametrize("entry", ["{path}", "file:{path}"])
def test_a_playlist_under_a_root_cannot_read_a_file_outside_every_root(root, entry):
    """An HLS playlist is a regular file under a root, so CreateStream takes it; its entries could name any file
    FFmpeg's file protocol reaches. The reader refuses the playlist's container before it opens any entry."""
    outside = root.parent / "secret.ts"
    with av.open(sample_clip_path("carphone_pristine.mp4")) as src, av.open(str(outside), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    playlist = root / "cam.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{entry.format(path=outside)}\n#EXT-X-ENDLIST\n"
    )
    url = check_source_url(str(playlist), source_roots=[str(root)])
    progress, received = read_to_end(url, fps=1.0)
    assert progress.state == SourceState.ERROR and "playlist" in progress.error, progress
    assert not received
