"""A local window smaller than one frame: each cluster still completes, so its record is written (before, every
frame left the window while its cluster was open, and no cluster ever completed, so none was ever made durable)."""

from __future__ import annotations

from mosaic_core.durable.manifest import replay
from tests.engine.engine_helpers import feed, make_engine


def test_a_window_smaller_than_a_frame_still_makes_every_sealed_cluster_durable(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, local_window_tokens=10, data_dir=str(tmp_path))  # a frame is 18 tokens
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    state = engine.stream("cam")
    sealed = {r.cluster_id for r in state.former.records() if r.sealed and r.cluster_id in engine.tiering.residency}
    store = engine.history.store
    assert store.flush(30)
    durable = set(replay(store.stream_dir("cam")).clusters)
    assert len(sealed) >= 3
    assert durable == sealed
    assert len(state.local) == 1, "the window keeps the newest frame, however small it is"
    engine.close()
