"""A stream state written at once (``DurableStore.write_state``) is on disk when the call returns, and the writer's
own pass, running beside it, never puts an older state back over it."""

from __future__ import annotations

import threading

from mosaic_core.durable.manifest import read_state
from mosaic_core.durable.store import DurableStore

WAIT_S = 10.0


class _HeldLock:
    """The store's I/O lock, which holds the writer thread once, just before it takes the lock, until ``go`` is set."""

    def __init__(self, lock) -> None:
        self._lock = lock
        self.armed = False
        self.reached = threading.Event()
        self.go = threading.Event()

    def __enter__(self):
        if self.armed and threading.current_thread().name == "durable-writer":
            self.armed = False
            self.reached.set()
            assert self.go.wait(WAIT_S), "the test did not let the writer go"
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


def test_a_state_written_at_once_is_on_disk_when_the_call_returns(tmp_path):
    store = DurableStore(tmp_path, writers=1, state_interval_s=3600.0)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.write_state("cam", clock_epoch_unix=1234.5)
        assert read_state(store.stream_dir("cam")) == {"clock_epoch_unix": 1234.5}
        store.write_state("gone", clock_epoch_unix=1.0)  # a stream the store does not hold: nothing written
        assert not store.stream_dir("gone").exists()
    finally:
        store.close(WAIT_S)


def test_the_writers_pass_does_not_put_an_older_state_back_over_one_written_at_once(tmp_path):
    store = DurableStore(tmp_path, writers=1, state_interval_s=0.05)
    try:
        store.create_stream("cam", {"fps": 1.0})
        assert store.flush(WAIT_S)
        held = store._io = _HeldLock(store._io)
        held.armed = True
        store.update_state("cam", frames_ingested=3)  # the writer's pass takes this state up, then waits for the lock
        assert held.reached.wait(WAIT_S), "the writer did not come to write the state"
        store.write_state("cam", clock_epoch_unix=1234.5)  # meanwhile
        held.go.set()
        assert store.flush(WAIT_S)
        assert read_state(store.stream_dir("cam")) == {"frames_ingested": 3, "clock_epoch_unix": 1234.5}
    finally:
        store.close(WAIT_S)
