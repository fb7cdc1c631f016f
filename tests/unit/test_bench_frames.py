"""The benchmarks' looped sample clips: a replayed pass gives what looping the decoder gives."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_core.bench.workload import looped_frames
from mosaic_core.model.video import iter_video_frames, sample_clip_path


@pytest.mark.parametrize("clip", ["bikes.mp4", "carphone_pristine.mp4"])
def test_looped_frames_are_the_looping_decoders(clip):
    """bikes.mp4 (10 whole seconds) is replayed from one pass; carphone (4.004 s) is decoded loop by loop."""
    ours = looped_frames(25, stream_id="cam", clip=clip, start_s=7.0)
    decoded = list(iter_video_frames(sample_clip_path(clip), fps=1.0, loop=True, max_frames=25, start_offset_s=7.0))
    assert [f.timestamp_s for f in ours] == pytest.approx([f.timestamp_s for f in decoded], abs=1e-9)
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(ours, decoded, strict=True))
    assert {f.stream_id for f in ours} == {"cam"}
