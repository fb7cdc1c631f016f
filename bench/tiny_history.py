"""The CPU benches' one stream of history: the tiny preset and the bikes clip, with clusters of about 3 frames, so
a history of thousands of clusters builds in minutes (``upkeep_scaling``, ``question_scaling``)."""

from __future__ import annotations


def tiny_engine_and_clip(stream_id: str, fps: float):
    """An engine on the tiny preset with ``stream_id`` open, and the bikes clip's ``(timestamp_s, rgb)`` at ``fps``."""
    import torch

    from mosaic_core.bookkeeping.formation_config import FormationConfig
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.engine import Engine
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    model = Qwen25VLAdapter.from_preset("tiny", device="cpu", dtype=torch.float32)
    clip = [(f.timestamp_s, f.rgb) for f in iter_video_frames(sample_clip_path("bikes.mp4"), fps=fps)]
    config = EngineConfig(
        target_tokens_per_frame=16,
        local_window_tokens=48,
        retrieval_budget_tokens=96,
        device_budget_bytes=8 * MIB,
        host_budget_bytes=2048 * MIB,
        formation=FormationConfig(max_tokens=48),
    )
    engine = Engine(model, config)
    engine.open_stream(stream_id, fps=fps)
    return engine, clip
