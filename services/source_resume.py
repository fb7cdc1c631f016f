"""Where a restarted file source goes on: the file time of the stream's last recorded frame (``file_position_s``),
and the stream times its frames get (``file_resume``).

A pulled file's reader stamps each frame with its time in the file (its sampler's time, passes of a looping file
included), and the worker adds an offset: the stream time is ``file time + offset``. The first reader's offset is 0.
A restarted one resumes after the newest frame of the stream's sealed clusters, what a crash leaves; the frames
after it that the stream had given out (queued, or in its window or open cluster) get back the times they had, and
the frames after those go on at the wall clock's time (``WorkerStreams._start_source``; with no sealed cluster the
file is read from its start, every frame on the clock as it goes on), so each restart starts a segment of the stream
clock with an offset of its own. The segments are kept in the stream's state (``FILE_OFFSETS``), written before the
new reader starts, as ``[after_s, offset_s]`` pairs: the frames stamped after ``after_s`` (None: all of them) have
that offset.

    stream clock   0 .... 40.0 .... 50.0 | crash; restart at 85.0 | 40.25 .... 50.0   95.25 ....
    file time      0 .... 40.0 .... 50.0 |                        | 40.25 .... 50.0   50.25 ....
                          sealed    given out                       (offset 0 again)  (offset 45.0)
    segments [[None, 0.0], [50.0, 45.0]]: 95.25 = 50.25 + 45.0, the first frame read again (40.25) read at 85.0

A segment starts after the newest frame time the stream had given out (every frame an older segment stamped is at or
before it), so a stream time maps to the file time it was read at in whichever segment it came, even after a restart
that recorded nothing (the next restart reads its frames again under the same segments). A restart keeps the
segments from the one its newest sealed frame came in: a later restart's sealed frames are no older.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)
FILE_OFFSETS = "file_offsets_s"  # the state field that holds the segments
SOURCE_LAST_OFFERED = "source_last_offered_s"  # the state field: the stream time of the last frame its source queued


@dataclass(frozen=True, slots=True)
class FileResume:
    """How a restarted file goes on (``file_resume``)."""

    position_s: float | None  # the file time it resumes after; None: its start
    segments: list[list]  # the clock segments to save (``FILE_OFFSETS``), this restart's last
    # (until_s, offset_s) in order: a frame takes the first offset that stamps it at or before until_s (the last: any)
    stamps: tuple[tuple[float | None, float], ...]
    rewinds: bool  # it stamps times the stream gave out before: its newest frame time goes back to its sealed one


def file_resume(
    state: dict,
    *,
    last_sealed_s: float | None,
    last_timestamp_s: float | None,
    clock_s: float | None,
    fallback_offset_s: float,
) -> FileResume:
    """Where a file restarted with the stream's saved ``state`` goes on, and the stream times of its frames.

    It resumes after the file time of ``last_sealed_s``, the newest frame of the stream's sealed clusters. Its frames
    up to the file time of the newest frame the stream had given out (the latest of ``last_timestamp_s``, the last
    frame its source queued and the segments' starts) take the stream times they had; the frames after it an offset
    that stamps them at the wall clock's time on the stream clock (``clock_s`` now, None: unknown) as they are read,
    paced from the first, or right after that newest frame where that is later.

    With no sealed cluster the file is read from its start at ``fallback_offset_s``, after every time given out, as
    with segments that are not readable or that give a time before the file's start: all of its frames up to the
    newest given out may be far more than a crash loses (retention may have dropped every cluster of a looping
    file), and taking their times back would replay them all before any new one.
    """
    saved = state.get(FILE_OFFSETS)
    checked = _checked(saved)
    given_out_s = _latest(
        last_sealed_s, last_timestamp_s, state.get(SOURCE_LAST_OFFERED), *(s[0] for s in checked or [])
    )
    if checked is None or last_sealed_s is None:
        return _from_the_start(saved if checked is not None else None, last_timestamp_s, fallback_offset_s)
    position_s = file_position_s(saved, last_sealed_s)
    if position_s is None or file_position_s(saved, given_out_s) is None:
        return _from_the_start(saved, last_timestamp_s, fallback_offset_s)
    checked = _with_the_first_reader(checked)
    kept = checked[_segment_of(checked, last_sealed_s) :]
    kept = [s for s in kept if s[0] is None or s[0] < given_out_s]  # a later one stamped nothing given out
    offset_s = kept[-1][1]
    if clock_s is not None:  # the first frame read, right after position_s, comes now
        offset_s = max(offset_s, clock_s - position_s)
    kept[0] = (None, kept[0][1])  # the segments before it stamped no frame read again
    untils = [s[0] for s in kept[1:]] + [given_out_s]
    stamps = (*zip(untils, (s[1] for s in kept), strict=True), (None, offset_s))
    return FileResume(position_s, [*map(list, kept), [given_out_s, offset_s]], stamps, rewinds=True)


def _from_the_start(saved: object, last_timestamp_s: float | None, offset_s: float) -> FileResume:
    segments = segments_after_restart(saved, after_s=last_timestamp_s, offset_s=offset_s)
    return FileResume(None, segments, ((None, offset_s),), rewinds=False)


def stream_time_s(stamps: tuple[tuple[float | None, float], ...], file_time_s: float) -> float:
    """The stream time of a frame read at ``file_time_s``, by ``stamps`` (``FileResume.stamps``)."""
    for until_s, offset_s in stamps[:-1]:
        if file_time_s + offset_s <= until_s:
            return file_time_s + offset_s
    return file_time_s + stamps[-1][1]


def _with_the_first_reader(segments: list[tuple[float | None, float]]) -> list[tuple[float | None, float]]:
    """Checked ``segments`` led by one for every frame from the first (none saved: the first reader's, offset 0)."""
    return segments if segments and segments[0][0] is None else [(None, 0.0), *segments]


def _segment_of(segments: list[tuple[float | None, float]], stream_time_s: float) -> int:
    """The index of the segment that stamped ``stream_time_s`` (``segments`` led by one for every frame): the last
    that starts before it."""
    return max(i for i, (after_s, _) in enumerate(segments) if after_s is None or stream_time_s > after_s)


def _latest(*values: object) -> float | None:
    times = [v for v in values if _is_time(v)]
    return max(times, default=None)


def file_position_s(segments: object, stream_time_s: float) -> float | None:
    """The file time of the frame stamped ``stream_time_s``, by the segment it came in (none saved: the first reader's,
    offset 0); None when the segments are not what this module writes (a garbled state: logged) or give a time before
    the file's start."""
    checked = _checked(segments)
    if checked is None:
        return None
    checked = _with_the_first_reader(checked)
    position_s = stream_time_s - checked[_segment_of(checked, stream_time_s)][1]
    return position_s if position_s >= 0 else None


def segments_after_restart(segments: object, *, after_s: float | None, offset_s: float) -> list[list]:
    """``segments`` with a new one for the frames stamped after ``after_s`` (None: every frame, a restart before any
    was given out), keeping of the older ones only what a later restart may still need: the newest segment before
    ``after_s``, where the frames up to it came (a segment that starts at or after it stamped nothing)."""
    if after_s is None:
        return [[None, offset_s]]
    older = [s for s in _checked(segments) or [] if s[0] is None or s[0] < after_s]
    return [*(list(s) for s in older[-1:]), [after_s, offset_s]]


def _checked(segments: object) -> list[tuple[float | None, float]] | None:
    """The segments in order of their start; None, logged, where they are not what this module writes."""
    if segments is None:
        return []
    ok = isinstance(segments, list) and all(
        isinstance(s, list) and len(s) == 2 and (s[0] is None or _is_time(s[0])) and _is_time(s[1]) for s in segments
    )
    if not ok:
        log.warning("a file source's saved clock segments (%s: %.200r) are not readable", FILE_OFFSETS, segments)
        return None
    return sorted(((s[0], float(s[1])) for s in segments), key=lambda s: -math.inf if s[0] is None else s[0])


def _is_time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_to_its_end(state: dict, last_sealed_s: float | None) -> bool:
    """Whether a file whose source had ended (``source_ended``) was recorded to its last frame: that frame's time
    (``SOURCE_LAST_OFFERED``) is in a sealed cluster. A state without it (an older release's) says yes, as it did."""
    last_offered_s = state.get(SOURCE_LAST_OFFERED)
    if not _is_time(last_offered_s):
        return True
    return last_sealed_s is not None and last_sealed_s >= last_offered_s
