"""Frames reach the device grouped by size, each at its position, through a staging buffer that is reused only once
the device has read it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.errors import EmptyBatchError, InvalidFrameError
from mosaic_core.model.frame_upload import FrameStaging

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def _frames(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _back(uploaded) -> dict[int, np.ndarray]:
    return {p: frames[row].cpu().numpy() for positions, frames in uploaded.groups for row, p in enumerate(positions)}


@pytest.mark.parametrize("device", DEVICES)
def test_frames_of_mixed_sizes_come_back_at_their_positions(device):
    frames = _frames([(6, 10), (12, 8), (6, 10), (5, 5), (12, 8)])
    uploaded = FrameStaging(device).upload(frames)
    assert uploaded.num_frames == 5
    assert sorted(len(positions) for positions, _ in uploaded.groups) == [1, 2, 2]
    back = _back(uploaded)
    for position, frame in enumerate(frames):
        np.testing.assert_array_equal(back[position], frame)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_staging_buffer_is_reused_in_pieces_without_overwriting_what_the_device_has_not_read():
    frame_bytes = 64 * 64 * 3
    staging = FrameStaging("cuda", max_bytes=3 * frame_bytes)  # 7 frames: three pieces, the buffer reused twice
    batches = [_frames([(64, 64)] * 7, seed=seed) for seed in range(4)]
    uploads = [staging.upload(batch) for batch in batches]  # queued back to back before any is read
    assert staging.num_bytes <= 3 * frame_bytes
    for batch, uploaded in zip(batches, uploads, strict=True):
        back = _back(uploaded)
        for position, frame in enumerate(batch):
            np.testing.assert_array_equal(back[position], frame)


def test_bad_batches_are_refused():
    staging = FrameStaging("cpu")
    with pytest.raises(EmptyBatchError):
        staging.upload([])
    with pytest.raises(InvalidFrameError):
        staging.upload([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(InvalidFrameError):
        staging.upload([np.zeros((2, 4, 4, 3), np.uint8)])
