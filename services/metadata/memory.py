"""In-memory metadata store: the embedded default, for one process with no Redis."""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from collections.abc import Callable

from mosaic_core.errors import UnknownStreamError
from services.metadata.base import ClusterMeta, MetadataStore, StreamRecord, validate_id


def _copy_stream(record: StreamRecord) -> StreamRecord:
    return dataclasses.replace(record, labels=dict(record.labels))


def _copy_cluster(meta: ClusterMeta, **changes: object) -> ClusterMeta:
    return dataclasses.replace(meta, centroid_summary=list(meta.centroid_summary), **changes)


class _StreamState:
    """One stream's record, clusters and time index.

    ``tindex`` holds ``(start_s, cluster_id)`` sorted; ``max_span_s`` bounds ``end_s - start_s`` over every
    cluster ever stored, so the clusters overlapping ``[a, b]`` all start within ``[a - max_span_s, b]``
    (the same trick as the Redis store, see ``schema.py``).
    """

    __slots__ = ("clusters", "max_span_s", "record", "tindex")

    def __init__(self, record: StreamRecord) -> None:
        self.record = record
        self.clusters: dict[str, ClusterMeta] = {}
        self.tindex: list[tuple[float, str]] = []
        self.max_span_s = 0.0

    def unindex(self, meta: ClusterMeta) -> None:
        entry = (meta.start_s, meta.cluster_id)
        i = bisect.bisect_left(self.tindex, entry)
        assert i < len(self.tindex) and self.tindex[i] == entry, f"time index lost {entry}"
        del self.tindex[i]


class InMemoryMetadataStore(MetadataStore):
    """Thread-safe in-memory ``MetadataStore``; one lock serialises every call.

    Args:
        clock: wall-clock source for ``updated_s`` (seconds).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamState] = {}
        self._workers: dict[str, set[str]] = {}

    # --- streams -----------------------------------------------------------------------------------

    def put_stream(self, record: StreamRecord, *, if_absent: bool = False) -> bool:
        with self._lock:
            state = self._streams.get(record.stream_id)
            if state is not None and if_absent:
                return False
            if state is None:
                state = self._streams[record.stream_id] = _StreamState(_copy_stream(record))
                self._assign(record.stream_id, None, record.worker_id)
            else:
                self._assign(record.stream_id, state.record.worker_id, record.worker_id)
                state.record = _copy_stream(record)
            return True

    def get_stream(self, stream_id: str) -> StreamRecord | None:
        with self._lock:
            state = self._streams.get(stream_id)
            return None if state is None else _copy_stream(state.record)

    def list_streams(self) -> list[StreamRecord]:
        with self._lock:
            return [_copy_stream(self._streams[s].record) for s in sorted(self._streams)]

    def delete_stream(self, stream_id: str) -> bool:
        with self._lock:
            state = self._streams.pop(stream_id, None)
            if state is None:
                return False
            self._assign(stream_id, state.record.worker_id, None)
            return True

    def set_worker(self, stream_id: str, worker_id: str | None) -> None:
        if worker_id is not None:
            validate_id("worker_id", worker_id)
        with self._lock:
            state = self._require(stream_id)
            self._assign(stream_id, state.record.worker_id, worker_id)
            state.record.worker_id = worker_id

    def streams_on_worker(self, worker_id: str) -> list[str]:
        with self._lock:
            return sorted(self._workers.get(worker_id, ()))

    def assignments(self) -> dict[str, str]:
        with self._lock:
            return {s: w for w, streams in self._workers.items() for s in streams}

    # --- clusters ----------------------------------------------------------------------------------

    def put_cluster(self, meta: ClusterMeta) -> None:
        now_s = self._clock()
        with self._lock:
            state = self._require(meta.stream_id)
            old = state.clusters.get(meta.cluster_id)
            if old is not None:
                state.unindex(old)
            stored = _copy_cluster(meta, updated_s=now_s)
            state.clusters[meta.cluster_id] = stored
            bisect.insort(state.tindex, (stored.start_s, stored.cluster_id))
            state.max_span_s = max(state.max_span_s, stored.span_s)

    def get_cluster(self, stream_id: str, cluster_id: str) -> ClusterMeta | None:
        with self._lock:
            state = self._streams.get(stream_id)
            meta = None if state is None else state.clusters.get(cluster_id)
            return None if meta is None else _copy_cluster(meta)

    def list_clusters(self, stream_id: str) -> list[ClusterMeta]:
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                return []
            return [_copy_cluster(state.clusters[c]) for _, c in state.tindex]

    def clusters_in_range(self, stream_id: str, start_s: float, end_s: float) -> list[ClusterMeta]:
        self._check_range(start_s, end_s)
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                return []
            lo = bisect.bisect_left(state.tindex, start_s - state.max_span_s, key=lambda e: e[0])
            hi = bisect.bisect_right(state.tindex, end_s, key=lambda e: e[0])
            found = (state.clusters[c] for _, c in state.tindex[lo:hi])
            return [_copy_cluster(m) for m in found if m.end_s >= start_s]

    def move_cluster(self, stream_id: str, cluster_id: str, *, from_tier: str, to_tier: str, location: str) -> bool:
        self._check_move(from_tier, to_tier, location)
        now_s = self._clock()
        with self._lock:
            state = self._streams.get(stream_id)
            meta = None if state is None else state.clusters.get(cluster_id)
            if meta is None or meta.tier != from_tier:
                return False
            meta.tier, meta.location, meta.updated_s = to_tier, location, now_s
            return True

    def delete_cluster(self, stream_id: str, cluster_id: str) -> bool:
        with self._lock:
            state = self._streams.get(stream_id)
            meta = None if state is None else state.clusters.pop(cluster_id, None)
            if meta is None:
                return False
            state.unindex(meta)
            return True

    def apply_retention(self, stream_id: str, now_s: float) -> list[str]:
        with self._lock:
            state = self._require(stream_id)
            if state.record.retention_s <= 0:
                return []
            cutoff_s = now_s - state.record.retention_s
            hi = bisect.bisect_left(state.tindex, cutoff_s, key=lambda e: e[0])
            expired = [c for _, c in state.tindex[:hi] if state.clusters[c].end_s < cutoff_s]
            for cluster_id in expired:
                state.unindex(state.clusters.pop(cluster_id))
            return expired

    # --- helpers (lock held) -----------------------------------------------------------------------

    def _require(self, stream_id: str) -> _StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        return state

    def _assign(self, stream_id: str, old_worker: str | None, new_worker: str | None) -> None:
        if old_worker is not None:
            streams = self._workers[old_worker]
            streams.discard(stream_id)
            if not streams:
                del self._workers[old_worker]
        if new_worker is not None:
            self._workers.setdefault(new_worker, set()).add(stream_id)
