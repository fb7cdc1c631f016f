"""A file source resumed after a position: the frames after it, paced from there, in the thread or a child process."""

from __future__ import annotations

import time

import av
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


def test_a_resumed_reader_paces_from_its_first_frame_after_decoding_up_to_its_position(tmp_path) -> None:
    """MPEG-TS has no keyframe index: the frames before the position are decoded and discarded (about half a second
    for bigbuckbunny's 4 s of 720p here). Paced from when the read began, the frames that time covers came at once."""
    path = str(tmp_path / "bunny.ts")
    with av.open(sample_clip_path("bigbuckbunny.mp4")) as source, av.open(path, "w", format="mpegts") as out:
        stream = source.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is not None:
                packet.stream = out_stream
                out.mux(packet)
    got: list[tuple[float, float]] = []
    reader = SourceReader(
        path, fps=25.0, sink=lambda t, rgb: got.append((t, time.monotonic())), resume_after_s=4.0
    ).start()
    try:
        deadline_s = time.monotonic() + 30
        while reader.progress().state is not SourceState.ENDED:
            assert time.monotonic() < deadline_s, reader.progress()
            time.sleep(0.05)
    finally:
        reader.stop()
    video_s = got[-1][0] - got[0][0]
    assert got[0][0] > 4.0 and video_s > 1.0
    assert got[-1][1] - got[0][1] > video_s - 0.1, (got[-1][1] - got[0][1], video_s)
