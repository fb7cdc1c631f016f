"""A write dropped by the write-behind queue's overflow while a resync runs is repaired by another resync: the
running one's view was taken before the dropped write, and its end cleared the request the overflow made."""

from __future__ import annotations

import threading

from services.metadata import ClusterMeta, InMemoryMetadataStore, StreamRecord
from services.publisher import MetadataPublisher, PutCluster, WorkerView

RECORD = StreamRecord(stream_id="cam", fps=1.0, worker_id="0", created_s=0.0)


def _meta(i: int) -> ClusterMeta:
    return ClusterMeta(
        cluster_id=f"cam/c{i}",
        stream_id="cam",
        start_s=float(i),
        end_s=float(i),
        first_frame=i,
        last_frame=i,
        num_tokens=1,
        num_bytes=1,
        tier="device",
        location="device:0",
    )


class SlowStore(InMemoryMetadataStore):
    """put_stream blocks the first time, so the test can enqueue while the first resync is mid-way."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def put_stream(self, record, *, if_absent=False):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return super().put_stream(record, if_absent=if_absent)


def test_an_overflow_during_a_resync_is_repaired():
    clusters: list[ClusterMeta] = []  # the worker's truth

    def snapshot() -> WorkerView:
        return WorkerView({"cam": RECORD}, {"cam": list(clusters)})

    store = SlowStore()
    publisher = MetadataPublisher(
        store, "0", snapshot, stream_ids=lambda: ["cam"], max_queue=2, resync_interval_s=3600
    ).start()
    try:
        assert store.entered.wait(10)  # the first resync took its snapshot (no cluster yet) and is writing
        for i in range(3):  # three new clusters after the snapshot; the queue holds two: the first is dropped
            clusters.append(_meta(i))
            publisher.enqueue(PutCluster(_meta(i)))
        assert publisher.snapshot_stats().writes_dropped == 1
        store.release.set()
        assert publisher.wait_idle(10)
    finally:
        publisher.stop()
    held = {m.cluster_id for m in store.list_clusters("cam")}
    assert held == {"cam/c0", "cam/c1", "cam/c2"}, f"store holds {sorted(held)}; resyncs={publisher.stats.resyncs}"
