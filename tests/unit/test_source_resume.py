"""A restarted file source's position, the file time of a stream time through the clock segments its restarts saved,
and the stream times its frames get: those the stream had given out the times they had, the next ones the wall
clock's."""

from __future__ import annotations

import pytest

from services.source_resume import (
    FileResume,
    file_position_s,
    file_resume,
    read_to_its_end,
    segments_after_restart,
    stream_time_s,
)


@pytest.mark.parametrize(
    ("segments", "stream_time_s", "position_s"),
    [
        (None, 12.25, 12.25),  # never restarted: the first reader stamps file time itself
        ([], 12.25, 12.25),
        ([[40.0, 55.0]], 40.0, 40.0),  # the last frame before the restart came with offset 0
        ([[40.0, 55.0]], 95.25, 40.25),
        ([[None, 12.5]], 20.0, 7.5),  # restarted before any frame was given out: every frame has the new offset
        ([[None, 10.0], [30.0, 50.0]], 30.0, 20.0),
        ([[30.0, 50.0], [None, 10.0]], 60.0, 10.0),  # in any order
        ([[40.0, 55.0]], 30.0, 30.0),
        ([[None, 50.0]], 20.0, None),  # before the file's start: not a position
        ([[40.0]], 50.0, None),  # garbled: not a position (the file is read from its start)
        ("40,55", 50.0, None),
        ([[40.0, float("nan")]], 50.0, None),
        ([[True, 55.0]], 50.0, None),
    ],
)
def test_a_stream_time_maps_to_the_file_time_it_was_read_at(segments, stream_time_s, position_s) -> None:
    assert file_position_s(segments, stream_time_s) == position_s


def test_restarts_keep_what_a_later_restart_needs() -> None:
    # Read from 0 with offset 0; restarted at stream time 40 (file time 40) to go on at stream time 95 (offset 55).
    segments = segments_after_restart(None, after_s=40.0, offset_s=55.0)
    assert segments == [[40.0, 55.0]]
    # Restarted again before any frame of the second reader was recorded: that reader's segment stamped nothing.
    segments = segments_after_restart(segments, after_s=40.0, offset_s=70.0)
    assert segments == [[40.0, 70.0]]
    assert file_position_s(segments, 40.0) == 40.0
    assert file_position_s(segments, 111.0) == 41.0
    # A third restart after the third reader recorded up to 111: only the newest segment before it is kept.
    segments = segments_after_restart(segments, after_s=111.0, offset_s=200.0)
    assert segments == [[40.0, 70.0], [111.0, 200.0]]
    assert file_position_s(segments, 111.0) == 41.0
    assert file_position_s(segments, 242.0) == 42.0
    segments = segments_after_restart(segments, after_s=242.0, offset_s=300.0)
    assert segments == [[111.0, 200.0], [242.0, 300.0]]


def test_a_restart_before_any_frame_was_given_out_starts_one_segment_for_every_frame() -> None:
    assert segments_after_restart([[40.0, 55.0]], after_s=None, offset_s=9.0) == [[None, 9.0]]
    assert segments_after_restart("garbled", after_s=40.0, offset_s=9.0) == [[40.0, 9.0]]


@pytest.mark.parametrize(
    ("state", "last_sealed_s", "ended"),
    [
        ({}, None, True),  # an older release's state: ended, as it was
        ({"source_last_offered_s": None}, 3.0, True),
        ({"source_last_offered_s": 3.75}, 3.75, True),
        ({"source_last_offered_s": 3.75}, 2.5, False),  # its last frames are in no sealed cluster: read them
        ({"source_last_offered_s": 3.75}, None, False),
    ],
)
def test_an_ended_file_stays_ended_only_when_its_last_frame_is_recorded(state, last_sealed_s, ended) -> None:
    assert read_to_its_end(state, last_sealed_s) is ended


def _resume(state: dict, last_sealed_s, last_timestamp_s, clock_s=85.0) -> FileResume:
    return file_resume(state, last_sealed_s=last_sealed_s, last_timestamp_s=last_timestamp_s, clock_s=clock_s,
                       fallback_offset_s=-1.0)  # fmt: skip


def _stamped(resume: FileResume, file_times_s: list[float]) -> list[float]:
    return [stream_time_s(resume.stamps, t) for t in file_times_s]


def test_frames_read_again_get_the_times_the_stream_gave_them_and_the_next_ones_the_wall_clocks() -> None:
    # Sealed up to 40, given out up to 50 (window, open cluster), restarted at 85 s on the clock: from file time 40.
    resume = _resume({}, 40.0, 50.0)
    assert (resume.position_s, resume.segments, resume.rewinds) == (40.0, [[None, 0.0], [50.0, 45.0]], True)
    # The first frame read again comes now, at 85: one read 10 s later, past the frames given out, at 95.
    assert _stamped(resume, [40.25, 45.0, 50.0, 50.25, 60.0]) == [40.25, 45.0, 50.0, 95.25, 105.0]
    assert [file_position_s(resume.segments, t) for t in (45.0, 50.0, 95.25)] == [45.0, 50.0, 50.25]


def test_the_frames_its_source_queued_before_the_crash_take_their_times_back_too() -> None:
    resume = _resume({"source_last_offered_s": 52.0}, 40.0, 50.0)
    assert resume.segments == [[None, 0.0], [52.0, 45.0]]
    assert _stamped(resume, [52.0, 52.25]) == [52.0, 97.25]


def test_a_clock_behind_the_frames_given_out_goes_on_right_after_them() -> None:
    assert _stamped(_resume({}, 40.0, 50.0, clock_s=41.0), [50.0, 50.25]) == [50.0, 51.25]
    assert _stamped(_resume({}, 40.0, 50.0, clock_s=None), [50.0, 50.25]) == [50.0, 50.25]  # no clock start saved


def test_a_second_crash_before_the_frames_read_again_were_sealed_keeps_their_times() -> None:
    first = _resume({}, 40.0, 50.0)
    # Ingested again up to 46 (queued to 47), nothing sealed since, restarted at 120: 50 was given out all the same.
    state = {"file_offsets_s": first.segments, "source_last_offered_s": 47.0}
    resume = _resume(state, 40.0, 46.0, clock_s=120.0)
    assert (resume.position_s, resume.segments) == (40.0, [[None, 0.0], [50.0, 80.0]])  # the first's stamped nothing
    assert _stamped(resume, [46.0, 50.0, 50.25]) == [46.0, 50.0, 130.25]


def test_a_restart_sealed_in_an_older_segment_stamps_each_frame_by_the_segment_it_came_in() -> None:
    # Read to 50 with offset 0, then from file time 50 with 45, then from 55.25 (stream time 100.25) with 77.75.
    segments = [[None, 0.0], [50.0, 45.0], [100.25, 77.75]]
    resume = _resume({"file_offsets_s": segments}, 45.0, 140.0, clock_s=300.0)
    assert resume.position_s == 45.0
    assert resume.segments == [*segments, [140.0, 255.0]]
    file_times_s = [45.25, 50.0, 50.25, 55.25, 55.5, 62.25, 62.5]
    assert _stamped(resume, file_times_s) == [45.25, 50.0, 95.25, 100.25, 133.25, 140.0, 317.5]
    assert [file_position_s(resume.segments, t) for t in _stamped(resume, file_times_s)] == file_times_s


def test_a_restart_keeps_the_segments_from_the_one_its_newest_sealed_frame_came_in() -> None:
    segments = [[None, 0.0], [50.0, 45.0]]
    resume = _resume({"file_offsets_s": segments}, 97.25, 100.25, clock_s=130.0)
    assert (resume.position_s, resume.segments) == (52.25, [[None, 45.0], [100.25, 77.75]])
    assert _stamped(resume, [55.25, 55.5]) == [100.25, 133.25]


@pytest.mark.parametrize(
    ("state", "last_sealed_s", "last_timestamp_s", "segments"),
    [
        ({}, None, None, [[None, -1.0]]),  # nothing given out: every frame on the clock as it goes on
        # No sealed cluster: its frames given out may be every one since it started (retention dropped its clusters).
        ({"source_last_offered_s": 3.75}, None, 3.5, [[3.5, -1.0]]),
        ({"file_offsets_s": "garbled"}, 40.0, 50.0, [[50.0, -1.0]]),
        ({"file_offsets_s": [[None, 50.0]]}, 20.0, 30.0, [[None, 50.0], [30.0, -1.0]]),  # before the file's start
    ],
)
def test_without_a_position_the_file_is_read_from_its_start_after_every_time_given_out(
    state, last_sealed_s, last_timestamp_s, segments
) -> None:
    resume = _resume(state, last_sealed_s, last_timestamp_s)
    assert (resume.position_s, resume.segments, resume.rewinds) == (None, segments, False)
    assert _stamped(resume, [0.0, 7.5]) == [-1.0, 6.5]
