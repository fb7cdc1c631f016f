"""The publisher's drift check asks the worker for its stream ids only, and still repairs a store that lost a
stream. Real publisher thread and in-memory store, a check every 20 ms."""

from __future__ import annotations

import time

from services.metadata import InMemoryMetadataStore, StreamRecord
from services.publisher import MetadataPublisher, WorkerView

RECORD = StreamRecord(stream_id="cam", fps=1.0, worker_id="0", created_s=0.0)


def test_drift_checks_read_stream_ids_and_a_lost_stream_is_published_again():
    calls = {"snapshot": 0, "stream_ids": 0}

    def snapshot() -> WorkerView:
        calls["snapshot"] += 1
        return WorkerView({"cam": RECORD}, {"cam": []})

    def stream_ids() -> list[str]:
        calls["stream_ids"] += 1
        return ["cam"]

    store = InMemoryMetadataStore()
    publisher = MetadataPublisher(store, "0", snapshot, stream_ids=stream_ids, resync_interval_s=0.02).start()
    try:
        assert publisher.wait_idle(5) and store.streams_on_worker("0") == ["cam"]
        deadline = time.monotonic() + 10
        while calls["stream_ids"] < 5:
            assert time.monotonic() < deadline, "the publisher stopped checking for drift"
            time.sleep(0.01)
        assert calls["snapshot"] == 1, "only the first publication reads the whole view"
        store.delete_stream("cam")  # the store lost the stream (Redis restarted empty)
        while store.streams_on_worker("0") != ["cam"]:
            assert time.monotonic() < deadline, "the drift was not repaired"
            time.sleep(0.01)
    finally:
        publisher.stop()
    assert calls["snapshot"] == 2 and publisher.snapshot_stats().resyncs == 2
