"""Write-behind of a worker's metadata into the store, off the engine thread, with self-repair.

The worker's engine and its data directory are the truth; the metadata store (Redis) is an index of them that
the router and outside tools read. So nothing on the engine thread waits for the store:

- ``TierSync`` (engine thread) turns what changed into small ops and ``enqueue``s them: a bounded queue that
  drops its oldest op when full (counted) and then asks for a full resync;
- one publisher thread applies the ops. When a write fails (store down, frozen, restarted empty), the store
  is marked down, retried with backoff, and once it answers again the worker's whole view is published anew;
- a worker that cannot say what it holds (its engine thread stuck past its call's timeout) is asked again after
  ``resync_interval_s``; the store did not fail, so it is not marked down;
- every ``resync_interval_s`` the thread compares the store's list of this worker's streams with its own and
  resyncs on any difference, which repairs drift even when no write failed (Redis restarted empty between
  two writes). The check asks the worker for its stream ids only (``stream_ids``): a whole view lists every
  cluster, which for a camera kept for months is thousands, on the engine thread.

A resync writes every stream record and cluster of this worker and deletes what the store has for this worker
that the worker does not: deleted streams (a DeleteStream during an outage) and merged-away clusters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mosaic_core.errors import NotFoundError
from services.metadata.base import ClusterMeta, MetadataStore, StreamRecord

log = logging.getLogger(__name__)
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class PutCluster:
    meta: ClusterMeta


@dataclass(slots=True)
class DeleteCluster:
    stream_id: str
    cluster_id: str


@dataclass(slots=True)
class PutStream:
    record: StreamRecord


@dataclass(slots=True)
class DeleteStream:
    stream_id: str


Op = PutCluster | DeleteCluster | PutStream | DeleteStream


@dataclass(slots=True)
class WorkerView:
    """Everything this worker would publish: its stream records and each stream's cluster metadata."""

    streams: dict[str, StreamRecord]
    clusters: dict[str, list[ClusterMeta]]


@dataclass(slots=True)
class PublisherStats:
    store_up: bool = True
    queue_depth: int = 0
    writes_dropped: int = 0
    write_errors: int = 0
    resyncs: int = 0
    last_error: str = ""


class MetadataPublisher:
    """Applies metadata ops to ``store`` in a background thread.

    Args:
        store: the shared metadata store.
        worker_id: this worker; the store's stream assignments say which streams are its to repair.
        snapshot: returns the worker's current ``WorkerView`` (called from the publisher thread).
        stream_ids: returns the ids of the worker's streams, for the drift check (called from the publisher
            thread); None takes them from ``snapshot``.
        max_queue: ops that may wait; beyond it the oldest is dropped and a resync is scheduled.
        resync_interval_s: how often the store's view of this worker is checked for drift.
    """

    def __init__(
        self,
        store: MetadataStore,
        worker_id: str,
        snapshot: Callable[[], WorkerView],
        *,
        stream_ids: Callable[[], Iterable[str]] | None = None,
        max_queue: int = 10_000,
        resync_interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.snapshot = snapshot
        self.stream_ids = stream_ids if stream_ids is not None else lambda: snapshot().streams
        self.max_queue = max_queue
        self.resync_interval_s = resync_interval_s
        self.stats = PublisherStats()
        self._queue: deque[Op] = deque()
        self._cv = threading.Condition()
        self._need_resync = True  # the first pass publishes everything the worker restored
        self._resyncing = False  # a resync's view was taken and is being written
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="metadata-publisher", daemon=True)

    def start(self) -> MetadataPublisher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    def enqueue(self, op: Op) -> None:
        """Never blocks: when the queue is full the oldest op is dropped and a full resync scheduled."""
        with self._cv:
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self.stats.writes_dropped += 1
                self._need_resync = True
            self._queue.append(op)
            self.stats.queue_depth = len(self._queue)
            self._cv.notify_all()

    def request_resync(self) -> None:
        with self._cv:
            self._need_resync = True
            self._cv.notify_all()

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Waits until the queue is empty and no resync is due (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._queue or self._need_resync or self._resyncing) and time.monotonic() < deadline:
                self._cv.wait(0.05)
            return not (self._queue or self._need_resync or self._resyncing)

    def snapshot_stats(self) -> PublisherStats:
        with self._cv:
            return PublisherStats(**{f: getattr(self.stats, f) for f in PublisherStats.__slots__})

    # -- publisher thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        failures, next_check = 0, time.monotonic() + self.resync_interval_s
        while True:
            with self._cv:
                while not (self._queue or self._need_resync or self._stop) and time.monotonic() < next_check:
                    self._cv.wait(max(0.01, next_check - time.monotonic()))
                if self._stop:
                    return
                resync, op = self._need_resync, (self._queue[0] if self._queue else None)
            try:
                if resync:
                    self._resync()
                elif op is not None:
                    if not _apply(self.store, op):
                        self.request_resync()  # the store lacks the op's stream: it lost data, or a delete raced
                else:
                    if self._drifted():
                        self.request_resync()
                    next_check = time.monotonic() + self.resync_interval_s
                    continue
            except _WorkerSilent as err:  # the store is not at fault: it is not marked down, and the view asked again
                log.warning("the worker did not say what it holds, for the metadata store: %s", err.__cause__)
                with self._cv:
                    self._need_resync |= resync
                    self._resyncing = False
                    self._cv.wait(self.resync_interval_s)
                continue
            except Exception as err:
                failures += 1
                with self._cv:
                    self.stats.store_up = False
                    self.stats.write_errors += 1
                    self.stats.last_error = f"{type(err).__name__}: {err}"
                    self._need_resync = True  # what failed, and what changed meanwhile, is republished whole
                    self._resyncing = False
                if failures == 1 or failures % 20 == 0:
                    log.warning("metadata store write failed (%d in a row): %s", failures, err)
                with self._cv:
                    self._cv.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])
                continue
            if failures:
                log.warning("metadata store answers again after %d failed writes", failures)
            failures = 0
            with self._cv:
                self.stats.store_up = True
                if resync:
                    self._resyncing = False  # ops queued during it still run (newer); one it dropped asks again
                elif self._queue and self._queue[0] is op:
                    self._queue.popleft()
                self.stats.queue_depth = len(self._queue)
                self._cv.notify_all()

    def _drifted(self) -> bool:
        return set(self.store.streams_on_worker(self.worker_id)) != set(self._ask_worker(self.stream_ids))

    @staticmethod
    def _ask_worker(question: Callable):
        """``question()`` (the worker's view or stream ids, from its engine thread); ``_WorkerSilent`` if it fails,
        a stuck engine thread's timeout, say."""
        try:
            return question()
        except Exception as err:
            raise _WorkerSilent() from err

    def _resync(self) -> None:
        with self._cv:
            self._queue.clear()  # the view taken next is newer than anything queued so far
            self._need_resync, self._resyncing = False, True  # a request from now on needs a view after this one
        view = self._ask_worker(self.snapshot)
        store = self.store
        for stream_id in set(store.streams_on_worker(self.worker_id)) - set(view.streams):
            store.delete_stream(stream_id)
        for stream_id, record in view.streams.items():
            store.put_stream(record)
            known = {meta.cluster_id: meta for meta in store.list_clusters(stream_id)}
            current = {meta.cluster_id: meta for meta in view.clusters.get(stream_id, [])}
            for cluster_id in known.keys() - current.keys():
                store.delete_cluster(stream_id, cluster_id)
            for cluster_id, meta in current.items():
                if _differs(known.get(cluster_id), meta):
                    store.put_cluster(meta)
        with self._cv:
            self.stats.resyncs += 1


class _WorkerSilent(Exception):
    """The worker could not give its view or stream ids (its ``__cause__`` says why)."""


def _differs(known: ClusterMeta | None, meta: ClusterMeta) -> bool:
    if known is None:
        return True
    fields = ("start_s", "end_s", "first_frame", "last_frame", "num_tokens", "num_bytes", "tier", "location")
    return any(getattr(known, f) != getattr(meta, f) for f in fields)


def _apply(store: MetadataStore, op: Op) -> bool:
    """Applies one op; False when a cluster's stream is not in the store."""
    if isinstance(op, PutCluster):
        try:
            store.put_cluster(op.meta)
        except NotFoundError:
            return False
    elif isinstance(op, DeleteCluster):
        store.delete_cluster(op.stream_id, op.cluster_id)
    elif isinstance(op, PutStream):
        store.put_stream(op.record)
    else:
        store.delete_stream(op.stream_id)
    return True
