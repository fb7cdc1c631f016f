"""A sampler resumed after a time yields what a sampler from the start yields after it: same times, same pixels."""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model import video
from mosaic_core.model.video import iter_video_frames, sample_clip_path

BIKES = "bikes.mp4"  # 640x272, 250 frames at 25 fps, 10 s, a keyframe about every 2 s
CARPHONE = "carphone_pristine.mp4"  # 176x144, 120 frames at 29.97 fps, 4.004 s


def _bikes_in_mpegts(path: str) -> str:
    """bikes.mp4's H.264 packets, unchanged, in MPEG-TS: a container without a keyframe index (no seeking)."""
    with av.open(sample_clip_path(BIKES)) as source, av.open(path, "w", format="mpegts") as out:
        stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is not None:
                packet.stream = out_stream
                out.mux(packet)
    return path


def _check_resumed(path: str, *, fps: float, loop: bool, num_frames: int, cut: int, offset_s: float = 0.0) -> None:
    whole = list(iter_video_frames(path, fps=fps, loop=loop, max_frames=num_frames, start_offset_s=offset_s))
    resume_s = whole[cut].timestamp_s - offset_s  # as a stream's clock gives it back: through a float
    rest = list(
        iter_video_frames(
            path, fps=fps, loop=loop, max_frames=num_frames - cut - 1, start_offset_s=offset_s, resume_after_s=resume_s
        )
    )
    assert [f.timestamp_s for f in rest] == [f.timestamp_s for f in whole[cut + 1 :]]
    for got, want in zip(rest, whole[cut + 1 :], strict=True):
        np.testing.assert_array_equal(got.rgb, want.rgb)


@pytest.mark.parametrize(("fps", "cut"), [(3.0, 0), (3.0, 13), (8.0, 9), (100.0, 57), (0.4, 2)])
def test_a_resumed_file_goes_on_with_the_frames_after_its_position(fps: float, cut: int) -> None:
    """Every rate: above the source's (100 fps: each frame), between frames, and sparse (0.4 fps seeks)."""
    path = sample_clip_path(CARPHONE if fps >= 8 else BIKES)
    num_frames = len(list(iter_video_frames(path, fps=fps)))
    _check_resumed(path, fps=fps, loop=False, num_frames=num_frames, cut=cut, offset_s=7.5)


@pytest.mark.parametrize("cut", [5, 7, 8, 30, 41])
def test_a_resumed_looping_file_goes_on_in_its_pass(cut: int) -> None:
    """carphone at 2 fps: 8 frames a pass, the 4.0-s instant taken by the next pass's first frame (4.004 s)."""
    _check_resumed(sample_clip_path(CARPHONE), fps=2.0, loop=True, num_frames=48, cut=cut)


def test_a_resumed_looping_file_opens_no_pass_before_its_position(monkeypatch) -> None:
    """Resumed after 100 passes of a 4-s clip, a sampler opens the first pass (its duration) and the one it resumes in,
    not the 99 between."""
    path = sample_clip_path(CARPHONE)
    opened = []
    real_open = video.open_source
    monkeypatch.setattr(video, "open_source", lambda source: opened.append(source) or real_open(source))
    frames = list(iter_video_frames(path, fps=2.0, loop=True, max_frames=3, resume_after_s=100 * 4.004 + 1.0))
    assert len(opened) == 2
    # The instants at 401.5, 402 and 402.5 s, in the pass that starts at 400.4 s: its frames 33, 48 and 63.
    assert [round(f.timestamp_s - 100 * 4.004, 6) for f in frames] == [1.1011, 1.6016, 2.1021]


def test_a_file_resumed_after_its_last_frame_yields_nothing() -> None:
    path = sample_clip_path(CARPHONE)
    last = list(iter_video_frames(path, fps=3.0))[-1]
    assert list(iter_video_frames(path, fps=3.0, resume_after_s=last.timestamp_s)) == []


@pytest.mark.parametrize(("fps", "cut"), [(3.0, 0), (3.0, 17), (0.5, 3), (30.0, 201)])
def test_a_file_without_a_keyframe_index_is_decoded_up_to_its_position(tmp_path, fps: float, cut: int) -> None:
    """MPEG-TS does not seek to a keyframe (``SEEK_FORMATS``): its frames before the position are decoded and
    discarded, and what follows is what a whole decode gives."""
    path = _bikes_in_mpegts(str(tmp_path / "bikes.ts"))
    num_frames = len(list(iter_video_frames(path, fps=fps)))
    _check_resumed(path, fps=fps, loop=False, num_frames=num_frames, cut=cut)


def test_decoding_up_to_a_far_position_logs_its_progress(tmp_path, monkeypatch, caplog) -> None:
    path = _bikes_in_mpegts(str(tmp_path / "bikes.ts"))
    monkeypatch.setattr(video, "PROGRESS_EVERY_S", 0.0)  # every frame passed logs
    with caplog.at_level(logging.INFO, logger=video.__name__):
        frames = list(iter_video_frames(path, fps=1.0, resume_after_s=8.0))
    assert [f.timestamp_s for f in frames] == [9.0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert lines and "at 8.000 s: decoded up to" in lines[-1] and str(path) in lines[-1]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "3"])
def test_a_bad_resume_time_raises(bad) -> None:
    with pytest.raises(InvalidArgumentError, match="resume_after_s"):
        next(iter_video_frames(sample_clip_path(CARPHONE), fps=1.0, resume_after_s=bad))
