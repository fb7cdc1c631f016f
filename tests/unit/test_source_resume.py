"""A restarted file source's position: the file time of a stream time, through the clock segments its restarts saved."""

from __future__ import annotations

import pytest

from services.source_resume import file_position_s, read_to_its_end, segments_after_restart


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
