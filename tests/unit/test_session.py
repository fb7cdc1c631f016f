"""A stream session's guards: pushed frames to a pulled stream, timestamps that go back or jump ahead, and
questions about a stream with nothing in it."""

from __future__ import annotations

import math
import time

import pytest

from mosaic_core.errors import InvalidArgumentError, StateError
from services.errors import NoFramesYetError
from services.metadata import StreamRecord
from services.session import StreamSession
from services.sources import SourceState


class _FailedSource:
    """A source that reports an error, as a real ``SourceReader`` does after its retries."""

    def progress(self):
        from services.sources import SourceProgress

        return SourceProgress(SourceState.ERROR, 0, None, 10, "Cannot open video source")


def _session(**fields) -> StreamSession:
    return StreamSession(StreamRecord(stream_id="cam", fps=1.0), **fields)


def test_a_pulled_stream_refuses_pushed_frames():
    session = _session(source=_FailedSource())
    with pytest.raises(StateError, match="pulls frames from its source") as refused:
        session.check_push(1.0, now=time.monotonic(), max_skew_s=60)
    assert refused.value.grpc_code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("timestamp_s", "accepted"),
    [(11.0, True), (70.0, True), (5000.0, False), (10.0, False), (9.0, False), (1e6, False)],
)
def test_pushed_timestamps_must_increase_and_not_jump_ahead(timestamp_s, accepted):
    now = time.monotonic()
    session = _session(anchor=(now - 5.0, 5.0), last_offered_s=10.0)  # clock now reads 10 s
    if accepted:
        session.check_push(timestamp_s, now=now, max_skew_s=60)
    else:
        with pytest.raises(InvalidArgumentError, match=r"not after|ahead of the stream's clock"):
            session.check_push(timestamp_s, now=now, max_skew_s=60)


def test_recorded_video_may_be_pushed_faster_than_real_time_in_small_steps():
    now = time.monotonic()
    session = _session(anchor=(now, 0.0), last_offered_s=0.0)
    for step in range(1, 500):  # 500 s of video pushed in no time, one frame a second
        session.check_push(float(step), now=now, max_skew_s=60)
        session.last_offered_s = float(step)


def test_unix_timestamps_are_checked_against_the_wall_clock():
    session = _session(anchor=(time.monotonic(), time.time()), last_offered_s=time.time())
    session.check_push(time.time() + 1.0, now=time.monotonic(), max_skew_s=60)
    with pytest.raises(InvalidArgumentError, match="ahead"):
        session.check_push(time.time() + 3600.0, now=time.monotonic(), max_skew_s=60)


def test_a_stream_with_no_frames_cannot_answer_and_says_why():
    with pytest.raises(NoFramesYetError, match="no frames yet"):
        _session().check_answerable(0)
    with pytest.raises(NoFramesYetError, match=r"its source failed \(Cannot open"):
        _session(source=_FailedSource()).check_answerable(0)
    _session(source=_FailedSource()).check_answerable(12)  # history from before the failure still answers


@pytest.mark.parametrize("timestamp_s", [math.nan, -math.inf, math.inf])
def test_a_pushed_frame_at_no_finite_time_is_refused_even_first(timestamp_s):
    session = StreamSession(StreamRecord(stream_id="cam", fps=1.0))
    with pytest.raises(InvalidArgumentError, match="finite"):
        session.check_push(timestamp_s, now=time.monotonic(), max_skew_s=5.0)


@pytest.mark.parametrize("wild_s", [-1e308, 1e308, -2e11])
def test_a_timestamp_far_from_any_clock_is_refused_and_the_stream_goes_on(wild_s):
    """A first frame at -1e308 used to set the stream's clock there; the next frame's sampling slot then overflowed,
    a non-Mosaic error that ended the whole PushFrames call as INTERNAL, frame after frame."""
    import numpy as np

    from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame

    session, queues = _session(), IngestQueues(8)
    queues.add_stream("cam", 5.0)
    now = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="within") as refused:
        session.check_push(wild_s, now=now, max_skew_s=120.0)
    assert refused.value.grpc_code == "INVALID_ARGUMENT"
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InvalidArgumentError, match="within"):
        queues.put(QueuedFrame("cam", wild_s, rgb, now))
    unix_s = time.time()
    session.check_push(unix_s, now=now, max_skew_s=120.0)
    assert queues.put(QueuedFrame("cam", unix_s, rgb, now)) is PutOutcome.QUEUED
