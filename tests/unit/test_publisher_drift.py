"""The publisher's drift check asks the worker for its stream ids only, and still repairs a store that lost a
stream. Real publisher thread and in-memory store, a check every 20 ms."""

from __future__ import annotations

import threading
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


def test_a_worker_that_cannot_say_what_it_holds_does_not_mark_the_store_down():
    """The drift check and a resync ask the worker's engine thread for its streams; a stuck one times out (the engine
    loop's ``call`` raises TimeoutError). The store answered every time: mosaic_metadata_store_up must stay 1 (else
    MosaicMetadataStoreDown sends the operator to a Redis that is fine), and the check goes on once the thread
    answers again."""
    stuck = threading.Event()
    stuck.set()
    calls = {"stream_ids": 0}

    def stream_ids() -> list[str]:
        calls["stream_ids"] += 1
        if stuck.is_set():
            raise TimeoutError("the engine thread did not take a command within 120 s; withdrawn")
        return ["cam"]

    store = InMemoryMetadataStore()
    view = WorkerView({"cam": RECORD}, {"cam": []})
    publisher = MetadataPublisher(store, "0", lambda: view, stream_ids=stream_ids, resync_interval_s=0.02).start()
    try:
        assert publisher.wait_idle(5)
        deadline = time.monotonic() + 10
        while calls["stream_ids"] < 3:
            assert time.monotonic() < deadline, "the publisher stopped checking for drift"
            time.sleep(0.01)
        stats = publisher.snapshot_stats()
        assert stats.store_up and stats.write_errors == 0, stats
        stuck.clear()
        seen = calls["stream_ids"]
        while calls["stream_ids"] < seen + 3:
            assert time.monotonic() < deadline, "the drift check did not go on once the worker answered"
            time.sleep(0.01)
        assert publisher.snapshot_stats().store_up
    finally:
        publisher.stop()
