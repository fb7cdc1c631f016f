"""Keyframe thumbnails made on the device for a whole upload: each frame's own, and close to what PIL made."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mosaic_core.bench.workload import CLIPS, looped_frames
from mosaic_core.engine.thumbnails import ThumbnailBatch, thumbnail, thumbnail_size
from mosaic_core.model.frame_upload import FrameStaging


@pytest.mark.parametrize("clip", CLIPS)
def test_a_thumbnail_is_within_one_level_of_pils_bilinear_resize(clip):
    rgb = looped_frames(2, stream_id="cam", clip=clip)[1].rgb  # real sample-clip frames, up to 1280x720
    height, width = rgb.shape[:2]
    size = thumbnail_size(height, width, 160)
    step = max(1, int(max(height, width) / 160) // 2)
    strided = np.ascontiguousarray(rgb[::step, ::step])
    pil = np.asarray(Image.fromarray(strided).resize(size[::-1], Image.BILINEAR)).astype(int)
    ours = thumbnail(rgb, 160)
    assert ours.shape == (*size, 3)
    assert np.abs(ours.astype(int) - pil).max() <= 1


def test_a_batch_gives_every_frame_its_own_thumbnail():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(90, 320, 3), (40, 40, 3), (90, 320, 3)]]
    batch = ThumbnailBatch(FrameStaging("cpu").upload(frames), 64)
    for position, frame in enumerate(frames):
        np.testing.assert_array_equal(batch.small(position), thumbnail(frame, 64))
    assert batch.small(1).shape == (40, 40, 3)  # never larger than the frame
    batch.small(0)[:] = 0  # an array of its own: the next caller sees the thumbnail unchanged
    np.testing.assert_array_equal(batch.small(0), thumbnail(frames[0], 64))
