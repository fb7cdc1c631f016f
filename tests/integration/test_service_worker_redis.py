"""A worker (in-process, no Ray) against a real redis-server: cluster records published behind the engine,
tier and location always together, retention, restore after a restart from the worker's data directory. The
engine is real (tiny preset on CPU) and its budgets are small enough that clusters spill device -> host -> disk
while frames arrive.
"""

from __future__ import annotations

import threading
import time

import pytest

from mosaic_core.config import MIB
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import Answer
from services.config import load_config
from services.metadata import StreamRecord
from services.metadata.redis_store import RedisMetadataStore
from services.metadata.schema import Keys
from services.worker import WorkerCore

FPS = 4.0


@pytest.fixture
def config(tmp_path_factory):
    return load_config(
        None,
        data_dir=str(tmp_path_factory.mktemp("data")),
        # Two streams' windows take 0.9 MiB of device pages (a page of 18 tokens holds one frame); 1.5 MiB leaves a
        # question room and still spills through the host tier to the disk.
        device_budget_bytes=3 * MIB // 2,
        host_budget_bytes=256 * 1024,
        disk_budget_bytes=16 * MIB,
        disk_dir=str(tmp_path_factory.mktemp("kv-disk")),
        ingest_queue_frames=64,
        max_batch_frames=8,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )


@pytest.fixture
def store(redis_client, redis_namespace):
    store = RedisMetadataStore(redis_client, namespace=redis_namespace)
    yield store


def _worker(tiny_model, config, store) -> WorkerCore:
    engine = Engine(tiny_model, config.engine_config(worker_subdir="worker-0"))
    return WorkerCore("0", config, store=store, engine=engine).wait_started(60)


def _open(worker: WorkerCore, store, stream_id: str, **fields) -> None:
    record = StreamRecord(stream_id=stream_id, fps=FPS, worker_id="0", created_s=time.time(), **fields)
    worker.open_stream(record)


def _push_and_wait(worker: WorkerCore, stream_id: str, frames, *, offset_s: float = 0.0) -> None:
    items = [(i, stream_id, offset_s + t, rgb) for i, (t, rgb) in enumerate(frames)]
    result = worker.push(items)
    assert result.accepted == len(frames) and not result.rejected
    target = worker.telemetry.totals(stream_id).ingested + len(frames)
    deadline = time.monotonic() + 120
    while worker.telemetry.totals(stream_id).ingested < target:
        assert time.monotonic() < deadline, "ingest did not finish"
        time.sleep(0.05)
    worker.loop.call(lambda: None)  # the iteration that ingested has queued its metadata by now
    assert worker.publisher.wait_idle(30), f"the publisher did not catch up: {worker.publisher.snapshot_stats()}"


def _engine_view(worker: WorkerCore, stream_id: str) -> dict:
    infos = worker.loop.call(worker.engine.clusters, stream_id)
    return {i.cluster_id: (i.tier, i.num_bytes, i.start_s, i.end_s) for i in infos}


def _store_view(store, stream_id: str) -> dict:
    return {m.cluster_id: (m.tier, m.num_bytes, m.start_s, m.end_s) for m in store.list_clusters(stream_id)}


def _check_location(tier: str, location: str) -> None:
    assert location.startswith(f"{tier}:"), f"tier {tier!r} disagrees with location {location!r}"


def test_clusters_tiers_and_locations_mirror_the_engine_atomically(
    tiny_model, config, store, redis_client, bikes_frames
):
    worker = _worker(tiny_model, config, store)
    keys = Keys(store.keys.namespace)
    torn: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # HGETALL is atomic: tier and location must always agree
        while not stop.is_set():
            for key in redis_client.scan_iter(match=keys.cluster("*", "*"), count=500):
                fields = redis_client.hgetall(key)
                if fields and not fields["location"].startswith(fields["tier"] + ":"):
                    torn.append(f"{key}: {fields['tier']} @ {fields['location']}")

    thread = threading.Thread(target=reader, daemon=True)
    try:
        _open(worker, store, "cam-a")
        _open(worker, store, "cam-b")
        thread.start()
        _push_and_wait(worker, "cam-a", bikes_frames[:24])
        _push_and_wait(worker, "cam-b", bikes_frames[:24], offset_s=100.0)
        for stream_id in ("cam-a", "cam-b"):
            assert _store_view(store, stream_id) == _engine_view(worker, stream_id)
        tiers = {t for s in ("cam-a", "cam-b") for t, *_ in _store_view(store, s).values()}
        assert {"device", "host", "disk"} <= tiers, f"budgets should spill through every tier, saw {tiers}"
        assert store.get_stream("cam-a").worker_id == "0"
        for meta in store.list_clusters("cam-a"):
            _check_location(meta.tier, meta.location)

        # A question fetches clusters back towards the device; the store follows.
        events = list(worker.ask("q1", "cam-a", "what moved?", 4, None, 60.0))
        assert isinstance(events[-1], Answer) and events[-1].evidence
        worker.loop.call(lambda: None)
        assert worker.publisher.wait_idle(30)
        assert _store_view(store, "cam-a") == _engine_view(worker, "cam-a")
        # Time-index queries see the same clusters as the engine's spans.
        in_range = store.clusters_in_range("cam-b", 101.0, 102.0)
        assert in_range and all(m.start_s <= 102.0 and m.end_s >= 101.0 for m in in_range)
    finally:
        stop.set()
        thread.join(5)
        worker.shutdown()
    assert not torn, torn[:3]


def test_retention_drops_old_clusters_from_engine_and_store(tiny_model, config, store, bikes_frames):
    worker = _worker(tiny_model, config, store)
    try:
        _open(worker, store, "cam-r", retention_s=2.0)
        _push_and_wait(worker, "cam-r", bikes_frames[:12])
        time.sleep(1.1)  # retention passes run at most once a second per stream
        _push_and_wait(worker, "cam-r", bikes_frames[12:24])
        assert "cam-r/c000000" not in _engine_view(worker, "cam-r")  # the loop's own pass dropped the oldest
        # One more pass now (the rate limit is per second of monotonic time) makes the result exact.
        dropped = worker.loop.call(worker.tier_sync.apply_retention, "cam-r", 2.0, now_s=time.monotonic() + 60)
        assert worker.publisher.wait_idle(30)
        view = _store_view(store, "cam-r")
        assert view == _engine_view(worker, "cam-r") != {}
        newest = bikes_frames[23][0]
        assert all(end >= newest - 2.0 for _, _, _, end in view.values()), (dropped, view)
        assert not set(dropped) & set(view)
    finally:
        worker.shutdown()


def test_restarted_worker_restores_streams_and_history_from_its_data_dir(tiny_model, config, store, bikes_frames):
    first = _worker(tiny_model, config, store)
    _open(first, store, "cam-x", labels={"site": "gate"})
    _push_and_wait(first, "cam-x", bikes_frames[:16])
    assert first.engine.history.store.flush(30)
    sealed = {
        c.cluster_id: (c.start_s, c.end_s, c.num_tokens)
        for c in first.loop.call(first.engine.clusters, "cam-x")
        if first.engine.history.store.owns(c.cluster_id)
    }
    assert sealed
    totals = first.telemetry.totals("cam-x")
    first.drain_telemetry()  # saves the counters with the stream's state, as the router's poll does
    assert first.engine.history.store.flush(30)
    first.loop.stop()  # the process "dies": nothing is closed or cleaned up
    first.publisher.stop()
    store.delete_stream("cam-x")  # and the index lost the stream meanwhile (Redis restarted empty)

    second = _worker(tiny_model, config, store)
    try:
        assert second.restored_streams == ["cam-x"]
        restored = {c.cluster_id: (c.start_s, c.end_s, c.num_tokens) for c in second.engine.clusters("cam-x")}
        assert restored == sealed
        assert second.telemetry.totals("cam-x") == totals
        assert second.publisher.wait_idle(30)
        assert store.get_stream("cam-x").labels == {"site": "gate"}  # republished from the worker
        assert _store_view(store, "cam-x") == _engine_view(second, "cam-x")
        # The stream takes frames again at once, after its last recorded time; old times are refused.
        late = second.push([(0, "cam-x", bikes_frames[0][0], bikes_frames[0][1])])
        assert late.rejected and "not after" in late.rejected[0].reason
        _push_and_wait(second, "cam-x", bikes_frames[:8], offset_s=100.0)
        assert set(_engine_view(second, "cam-x")) > set(sealed)
    finally:
        second.shutdown()
