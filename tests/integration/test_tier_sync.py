"""The metadata index follows the engine's clusters through growth, spills, fetches and retention, while each flush
compares only what changed: a flush after an ingest call looks at a few clusters however long the history.

Real engine (tiny preset on CPU, budgets small enough to spill device -> host -> disk), real publisher and the
in-memory store. The publisher's one resync is its first, of the empty stream, so the store's clusters come from
the tier sync's own puts and deletes.
"""

from __future__ import annotations

import dataclasses
import time

from mosaic_core.config import MIB
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.publisher import MetadataPublisher, WorkerView
from services.tier_sync import NEWEST_CLUSTERS, TierSync
from tests.engine.engine_helpers import SMALL

STREAM = "cam-t"


class CountingEngine:
    """The real engine, counting the cluster listings and lookups asked of it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.listings = 0
        self.lookups = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def clusters(self, stream_id):
        self.listings += 1
        return self._engine.clusters(stream_id)

    def cluster_info(self, stream_id, cluster_id):
        self.lookups += 1
        return self._engine.cluster_info(stream_id, cluster_id)


def _store_view(store) -> dict:
    return {m.cluster_id: (m.tier, m.num_bytes, m.end_s, m.last_frame) for m in store.list_clusters(STREAM)}


def _engine_view(engine: Engine) -> dict:
    return {i.cluster_id: (i.tier, i.num_bytes, i.end_s, i.last_frame) for i in engine.clusters(STREAM)}


def test_the_store_follows_the_engine_and_a_flush_compares_only_what_changed(tiny_model, bikes_frames, tmp_path):
    config = dataclasses.replace(
        SMALL,
        device_budget_bytes=2 * MIB,
        host_budget_bytes=256 * 1024,
        disk_budget_bytes=64 * MIB,
        disk_dir=str(tmp_path / "kv-disk"),
    )
    engine = CountingEngine(Engine(tiny_model, config))
    engine.open_stream(STREAM, fps=4.0)
    store = InMemoryMetadataStore()
    record = StreamRecord(stream_id=STREAM, fps=4.0, worker_id="0", created_s=time.time())
    publisher = MetadataPublisher(store, "0", lambda: WorkerView({STREAM: record}, {STREAM: []})).start()
    sync = TierSync(engine, publisher, "0")
    lookups_per_flush, tiers_seen = [], set()
    try:
        for lap in range(4):
            for t, rgb in bikes_frames:
                engine.ingest([FrameInput(STREAM, 10.0 * lap + t, rgb)])  # one frame a call, as the service's
                before = engine.lookups
                sync.flush([STREAM])
                lookups_per_flush.append(engine.lookups - before)
            assert publisher.wait_idle(30)
            assert _store_view(store) == _engine_view(engine._engine), f"lap {lap}"
            tiers_seen |= {tier for tier, *_ in _store_view(store).values()}
        dropped = sync.apply_retention(STREAM, 15.0, now_s=time.monotonic() + 60)
        sync.flush([])
        assert publisher.wait_idle(30)
        assert _store_view(store) == _engine_view(engine._engine), "after retention"
        stats = publisher.snapshot_stats()
    finally:
        publisher.stop()
    assert {"device", "host", "disk"} <= tiers_seen, f"the budgets should spill through every tier: {tiers_seen}"
    assert dropped, "retention should have dropped the first laps' clusters"
    assert stats.resyncs == 1 and stats.writes_dropped == 0, stats
    held = len(engine._engine.clusters(STREAM)) + len(dropped)
    assert engine.listings == 1, "only the stream's first flush lists all of its clusters"
    # The newest clusters, plus those that spills moved: a few, while the history held dozens.
    assert held > 40 and max(lookups_per_flush) <= NEWEST_CLUSTERS + 8, (held, sorted(lookups_per_flush)[-5:])
