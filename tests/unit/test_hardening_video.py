"""Sparse sampling decodes only what it samples, and FFmpeg opens only what the source's scheme needs."""

from __future__ import annotations

import time
from fractions import Fraction

import av
import numpy as np
import pytest

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model import video
from mosaic_core.model.video import iter_video_frames, sample_clip_path
from mosaic_core.model.video_sources import protocol_whitelist

BIKES = "bikes.mp4"  # 640x272, 250 frames at 25 fps, a keyframe about every 2 s


def _every_frame(path: str) -> list[tuple[Fraction, np.ndarray]]:
    """Reference: every frame of one pass, decoded in order, with its time since the first frame."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
        time_base = stream.time_base
    first = frames[0][0]
    return [((pts - first) * time_base, rgb) for pts, rgb in frames]


def _reference_samples(path: str, fps: Fraction, num_passes: int, clip_s: Fraction):
    """The first frame at or after each instant k / fps, over looping passes, from a full decode."""
    frames = _every_frame(path)
    out, next_k = [], 0
    for p in range(num_passes):
        for rel, rgb in frames:
            t = p * clip_s + rel
            if t * fps >= next_k:
                out.append((float(t), rgb))
                next_k = int(t * fps) + 1
    return out


@pytest.mark.parametrize("fps", [Fraction(1, 5), Fraction(1, 3), Fraction(2, 1)])
def test_seeking_sampler_gives_the_same_frames_as_a_full_decode(fps: Fraction) -> None:
    path = sample_clip_path(BIKES)
    # The sampler runs on the float fps it is given, exactly (1/3 as a float is a little under 1/3).
    reference = _reference_samples(path, Fraction(float(fps)), num_passes=3, clip_s=Fraction(10))
    reference = [r for r in reference if r[0] < 30.0]
    got = list(iter_video_frames(path, fps=float(fps), loop=True, max_frames=len(reference)))
    assert [f.timestamp_s for f in got] == pytest.approx([t for t, _ in reference], abs=1e-9)
    for frame, (_, rgb) in zip(got, reference, strict=True):
        np.testing.assert_array_equal(frame.rgb, rgb)


def _bikes_in(container_format: str, path: str) -> str:
    """bikes.mp4's H.264 packets, unchanged, in another container."""
    with av.open(sample_clip_path(BIKES)) as source, av.open(path, "w", format=container_format) as out:
        stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is not None:
                packet.stream = out_stream
                out.mux(packet)
    return path


def _one_keyframe_clip(container_format: str, path: str) -> str:
    """10 s of 25-fps MPEG-2 with a keyframe at its start only, as a camera with a long group of pictures records."""
    with av.open(path, "w", format=container_format) as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 250
        for i in range(250):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(
    ("make_clip", "container_format", "suffix"),
    [(_bikes_in, "mpegts", "ts"), (_one_keyframe_clip, "mpegts", "ts"), (_one_keyframe_clip, "mpeg", "mpg")],
    ids=["bikes-ts", "one-keyframe-ts", "one-keyframe-ps"],
)
@pytest.mark.parametrize("fps", [Fraction(1, 3), Fraction(1, 2)])
def test_a_sparse_sampler_of_a_file_without_a_keyframe_index_gives_the_frames_of_a_full_decode(
    tmp_path, make_clip, container_format: str, suffix: str, fps: Fraction
) -> None:
    """MPEG-TS and MPEG-PS seek by timestamp to a packet that need not be a keyframe; the decoder then drops every
    frame up to the next keyframe, so a seek for the instant at 2 s gave bikes' frame at 3.04 s (its next keyframe),
    and a clip with one keyframe gave its first frame only. A camera's recording is often MPEG-TS."""
    path = make_clip(container_format, str(tmp_path / f"clip.{suffix}"))
    reference = _reference_samples(path, Fraction(float(fps)), num_passes=1, clip_s=Fraction(10))
    got = list(iter_video_frames(path, fps=float(fps)))
    assert [f.timestamp_s for f in got] == pytest.approx([t for t, _ in reference], abs=1e-9)
    for frame, (_, rgb) in zip(got, reference, strict=True):
        np.testing.assert_array_equal(frame.rgb, rgb)


@pytest.mark.parametrize("fps", [Fraction(5), Fraction(25)])
def test_a_file_whose_container_only_estimates_its_duration_is_read_to_its_last_frame(tmp_path, fps) -> None:
    """FFmpeg estimates an MPEG-PS file's duration from the timestamps near its end: 9.36 s for this 10-s clip. A pass
    that ended where the next instant passed that estimate left out its last 0.64 s, 16 frames at 25 fps."""
    path = _one_keyframe_clip("mpeg", str(tmp_path / "clip.mpg"))
    reference = _reference_samples(path, fps, num_passes=1, clip_s=Fraction(10))
    got = list(iter_video_frames(path, fps=float(fps)))
    assert [f.timestamp_s for f in got] == pytest.approx([t for t, _ in reference], abs=1e-9)


def test_sparse_sampling_costs_less_cpu_than_decoding_every_frame(monkeypatch) -> None:
    path = sample_clip_path(BIKES)

    def cpu_s() -> float:
        start = time.process_time()
        frames = list(iter_video_frames(path, fps=0.2, loop=True, max_frames=8))
        assert len(frames) == 8
        return time.process_time() - start

    sparse = min(cpu_s() for _ in range(2))
    monkeypatch.setattr(video, "SEEK_MIN_GAP_S", float("inf"))  # no seeking: decode through every frame
    dense = min(cpu_s() for _ in range(2))
    assert sparse < 0.6 * dense, (sparse, dense)


@pytest.mark.parametrize(
    "source",
    ["concat:/etc/hostname|/etc/hostname", "data:video/mp4;base64,AAAA", "ftp://127.0.0.1/x.mp4",
     "tcp://127.0.0.1:9/", "file:///etc/hostname", "udp://127.0.0.1:9", "gopher://x/"],
)  # fmt: skip
def test_schemes_no_camera_uses_are_refused_before_ffmpeg(source: str) -> None:
    with pytest.raises(InvalidArgumentError, match="not supported"):
        next(iter_video_frames(source, fps=1.0))


def test_whitelist_follows_the_scheme() -> None:
    assert protocol_whitelist("/data/clip.mp4") == "file"
    assert "file" not in protocol_whitelist("https://example.com/a.mp4").split(",")
    assert "file" not in protocol_whitelist("rtsp://cam/stream").split(",")


@pytest.mark.parametrize("url", ["rtsp://cam.local/live", "RTSP://cam.local/live", "Rtsps://cam.local/live"])
def test_rtsp_is_opened_over_tcp_whatever_the_case_of_its_scheme(url):
    """The protocol check reads the scheme in any case, so the transport does too (UDP loses frames on lossy links)."""
    from mosaic_core.model.video_sources import open_options

    assert open_options(url)["rtsp_transport"] == "tcp"
    assert "rtsp_transport" not in open_options("http://cam.local/live.mp4")


@pytest.mark.parametrize("url", ["http://cam.local/live.m3u8", "HTTPS://cam.local/live.mpd"])
def test_http_reads_no_container_that_opens_further_urls(url):
    """A playlist's demuxer fetches the URLs it lists, on hosts that no check of the source URL saw."""
    from mosaic_core.model.video_sources import open_options

    formats = open_options(url)["format_whitelist"].split(",")
    assert {"mov", "mpegts", "mpjpeg"} <= set(formats)
    assert not {"hls", "dash", "concat", "imf"} & set(formats)
