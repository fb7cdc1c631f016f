"""Small builders for engine tests."""

from __future__ import annotations

import dataclasses

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import MIB, EngineConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput

SMALL = EngineConfig(
    target_tokens_per_frame=16,
    local_window_tokens=48,
    retrieval_budget_tokens=96,
    device_budget_bytes=8 * MIB,
    formation=FormationConfig(max_tokens=48),
)


def make_engine(model, **overrides) -> Engine:
    return Engine(model, dataclasses.replace(SMALL, **overrides))


def spilling_to_disk(model, disk_dir, **overrides) -> Engine:
    """An engine whose device and host tiers are small enough that the bikes clip's clusters reach a disk tier in
    ``disk_dir`` within its first frames."""
    budgets = {"device_budget_bytes": int(1.3 * MIB), "host_budget_bytes": int(0.3 * MIB)}
    return make_engine(model, **budgets, disk_budget_bytes=64 * MIB, disk_dir=str(disk_dir), **overrides)


def with_history(model, frames, stream_ids, *, num_frames: int = 16) -> Engine:
    """An engine whose streams have ingested ``num_frames`` frames each, the i-th stream starting at frame i."""
    engine = make_engine(model)
    for i, stream_id in enumerate(stream_ids):
        engine.open_stream(stream_id)
        feed(engine, stream_id, frames[i : i + num_frames])
    return engine


def durable_streams(model, frames, root, stream_ids, *, num_frames: int = 16):
    """``root``, made a data directory whose streams ``stream_ids`` (2 fps) have ingested ``num_frames`` frames each,
    sealed and durable."""
    engine = make_engine(model, data_dir=str(root))
    for stream_id in stream_ids:
        engine.open_stream(stream_id, fps=2.0)
        feed(engine, stream_id, frames[:num_frames])
    assert engine.history.store.flush(30)
    engine.close()
    return root


def feed(engine: Engine, stream_id: str, frames, *, batch: int = 8, offset_s: float = 0.0) -> None:
    items = [FrameInput(stream_id, t + offset_s, rgb) for t, rgb in frames]
    for i in range(0, len(items), batch):
        engine.ingest(items[i : i + batch])
