"""Where a restarted file source goes on: the file time of the stream's last recorded frame (``file_position_s``).

A pulled file's reader stamps each frame with its time in the file (its sampler's time, passes of a looping file
included), and the worker adds an offset: the stream time is ``file time + offset``. The first reader's offset is 0;
a restarted one's makes the stream clock go on at the wall clock's time (``WorkerStreams._start_source``), so each
restart starts a segment of the stream clock with an offset of its own. The segments are kept in the stream's state
(``FILE_OFFSETS``), written before the new reader starts, as ``[after_s, offset_s]`` pairs: the frames stamped after
``after_s`` (None: all of them) have that offset.

    stream clock   0 ........ 40.0 | crash | 95.2 ........
    file time      0 ........ 40.0         40.25 ........     segments [[40.0, 55.0]]: 95.2 = 40.2 + 55.0
                   (offset 0)              (offset 55.0)

A segment starts after the newest frame time the stream had given out (every frame an older segment stamped is at or
before it), so a stream time maps to the file time it was read at in whichever segment it came, even after a restart
that recorded nothing (the next restart finds its last frame in the older segment still).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
FILE_OFFSETS = "file_offsets_s"  # the state field that holds the segments
SOURCE_LAST_OFFERED = "source_last_offered_s"  # the state field: the stream time of the last frame its source queued


def file_position_s(segments: object, stream_time_s: float) -> float | None:
    """The file time of the frame stamped ``stream_time_s``, by the segment it came in (none saved: the first reader's,
    offset 0); None when the segments are not what this module writes (a garbled state: logged) or give a time before
    the file's start."""
    checked = _checked(segments)
    if checked is None:
        return None
    offset_s = 0.0
    for after_s, segment_offset_s in checked:
        if after_s is None or stream_time_s > after_s:
            offset_s = segment_offset_s
    position_s = stream_time_s - offset_s
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
