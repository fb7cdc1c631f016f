"""A file source resumed after a position: the frames after it, paced from there, in the thread or a child process."""

from __future__ import annotations

import time

import pytest

from mosaic_core.model.video import iter_video_frames, sample_clip_path
from services.sources import SourceReader, SourceState

BIKES = "bikes.mp4"  # 10 s at 25 fps


@pytest.mark.parametrize("decode_in_child", [False, True])
def test_a_resumed_file_reader_yields_the_frames_after_its_position_paced_from_there(decode_in_child) -> None:
    path = sample_clip_path(BIKES)
    expected = [f.timestamp_s for f in iter_video_frames(path, fps=2.0) if f.timestamp_s > 8.0]
    got: list[tuple[float, float]] = []
    started_s = time.monotonic()
    reader = SourceReader(
        path, fps=2.0, sink=lambda t, rgb: got.append((t, time.monotonic() - started_s)), resume_after_s=8.0,
        decode_in_child=decode_in_child,
    ).start()  # fmt: skip
    try:
        deadline_s = time.monotonic() + 30
        while reader.progress().state is not SourceState.ENDED:
            assert time.monotonic() < deadline_s, reader.progress()
            time.sleep(0.05)
    finally:
        reader.stop()
    assert [t for t, _ in got] == expected == [8.52, 9.0, 9.52]  # the first frames at or after 8.5, 9 and 9.5 s
    # Paced from the position: the frame at 8.52 s comes about 0.5 s in (a child takes a moment to start), not 8.5 s.
    assert got[0][1] < 4.0, got
    assert got[-1][1] - got[0][1] == pytest.approx(1.0, abs=0.5)
