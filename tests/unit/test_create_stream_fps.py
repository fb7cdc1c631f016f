"""CreateStream's fps: a number a camera can be sampled at, or INVALID_ARGUMENT with a sentence that names it."""

from __future__ import annotations

import pytest

from mosaic_core.errors import InvalidArgumentError
from services import convert
from services.gen.mosaic.v1 import mosaic_pb2 as pb


def _record(fps: float):
    return convert.record_from_request(pb.CreateStreamRequest(stream_id="cam", fps=fps), max_fps=60.0)


@pytest.mark.parametrize("fps", [convert.MIN_FPS, 0.5, 60.0])
def test_an_fps_within_the_limits_is_kept(fps):
    assert _record(fps).fps == fps


@pytest.mark.parametrize("fps", [1e-300, 5e-324, convert.MIN_FPS / 2])
def test_an_fps_below_one_frame_a_day_is_refused(fps):
    # A pulled source at 1e-300 fps read one frame, then waited past what a timer holds and stopped in ERROR with
    # "OverflowError: timestamp out of range for platform time_t"; a pushed one sampled out every later frame.
    with pytest.raises(InvalidArgumentError, match="one frame a day"):
        _record(fps)
