"""Turns one worker's engine changes into metadata ops for the write-behind publisher; applies retention.

Runs on the worker's engine-loop thread, the only thread that touches the engine, and does no network I/O:

- **clusters**: ``flush`` compares what changed with what it last published and enqueues a put for each new,
  grown or moved cluster (tier and location change together in one record) and a delete for each cluster that
  maintenance merged away or that was removed. What changed is what the engine's residency reported (a cluster
  added, grown, moved or removed) and each stream's newest clusters (a frame extends the open one), so a flush
  costs the changes, not the history: a camera kept for months has thousands of clusters, and comparing them all
  after every ingest call grew the engine thread's work with the history. A stream's first flush compares all of
  its clusters;
- **retention**: sealed, unpinned clusters that ended before ``newest frame - retention_s`` are dropped from
  the engine (and so from its durable history) and their records deleted from the store.

``snapshot`` gives the publisher the whole current view when the store must be rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mosaic_core.bookkeeping.tiers import Tier
from services.metadata.base import ClusterMeta
from services.publisher import DeleteCluster, MetadataPublisher, PutCluster

RETENTION_CHECK_INTERVAL_S = 1.0
# The newest clusters of a stream that each flush compares: a call's frames of one stream extend or start at most
# one more cluster than the clusters they start (a call holds one frame a stream by default). Others change only
# through the residency, which reports them.
NEWEST_CLUSTERS = 4


@dataclass(slots=True, frozen=True)
class _Written:
    """What was last published for one cluster."""

    tier: str
    end_s: float
    num_bytes: int
    last_frame: int


class TierSync:
    """Mirrors one engine's clusters into the metadata store through a ``MetadataPublisher``.

    Args:
        engine: the worker's engine; a change listener is attached to its residency.
        publisher: applies the ops off this thread.
        worker_id: worker index, part of each cluster's location string.
    """

    def __init__(self, engine, publisher: MetadataPublisher, worker_id: str) -> None:
        self.engine = engine
        self.publisher = publisher
        self.worker_id = worker_id
        self._changed: dict[str, set[str]] = {}  # stream -> clusters its residency reported since the last flush
        self._written: dict[str, dict[str, _Written]] = {}  # stream -> cluster -> what was last published
        self._last_retention_s: dict[str, float] = {}
        engine.tiering.residency.change_listeners.append(self._on_change)

    def location(self, tier: Tier) -> str:
        """Where the bytes are: ``device:<worker>``, ``host:<worker>`` or ``disk:<worker>``."""
        return f"{tier.name.lower()}:{self.worker_id}"

    def flush(self, stream_ids) -> None:
        """Publishes the new, grown, moved and removed clusters of every stream whose residency changed, and
        the newest clusters of ``stream_ids`` (the streams that just took frames)."""
        changed, self._changed = self._changed, {}
        for stream_id in set(stream_ids) | set(changed):
            if stream_id not in self.engine.streams:
                continue
            if stream_id not in self._written:
                self._diff_all(stream_id)
            else:
                ids = changed.get(stream_id, set()) | set(self.engine.newest_cluster_ids(stream_id, NEWEST_CLUSTERS))
                self._diff(stream_id, ids)

    def forget_stream(self, stream_id: str) -> None:
        """Drops what this worker remembers of a deleted stream (the publisher deletes its records)."""
        self._written.pop(stream_id, None)
        self._last_retention_s.pop(stream_id, None)
        self._changed.pop(stream_id, None)

    def cluster_metas(self, stream_id: str) -> list[ClusterMeta]:
        """The stream's clusters as the store records them (engine thread)."""
        return [self._meta(stream_id, info) for info in self.engine.clusters(stream_id)]

    def _on_change(self, stream_id: str, cluster_id: str) -> None:
        self._changed.setdefault(stream_id, set()).add(cluster_id)

    def _meta(self, stream_id: str, info) -> ClusterMeta:
        return ClusterMeta(
            cluster_id=info.cluster_id,
            stream_id=stream_id,
            start_s=info.start_s,
            end_s=info.end_s,
            first_frame=info.first_frame,
            last_frame=info.last_frame,
            num_tokens=info.num_tokens,
            num_bytes=info.num_bytes,
            tier=info.tier,
            location=self.location(Tier[info.tier.upper()]),
        )

    def _diff_all(self, stream_id: str) -> None:
        infos = {info.cluster_id: info for info in self.engine.clusters(stream_id)}
        written = self._written.setdefault(stream_id, {})
        for info in infos.values():
            self._publish(stream_id, info, written)
        for cluster_id in [c for c in written if c not in infos]:
            self.publisher.enqueue(DeleteCluster(stream_id, cluster_id))
            del written[cluster_id]

    def _diff(self, stream_id: str, cluster_ids: set[str]) -> None:
        written = self._written[stream_id]
        for cluster_id in cluster_ids:
            info = self.engine.cluster_info(stream_id, cluster_id)
            if info is not None:
                self._publish(stream_id, info, written)
            elif written.pop(cluster_id, None) is not None:
                self.publisher.enqueue(DeleteCluster(stream_id, cluster_id))

    def _publish(self, stream_id: str, info, written: dict[str, _Written]) -> None:
        current = _Written(info.tier, info.end_s, info.num_bytes, info.last_frame)
        if written.get(info.cluster_id) != current:
            self.publisher.enqueue(PutCluster(self._meta(stream_id, info)))
            written[info.cluster_id] = current

    def apply_retention(self, stream_id: str, retention_s: float, *, now_s: float | None = None) -> list[str]:
        """Drops the stream's clusters that ended before ``newest frame - retention_s``; returns their ids.

        Runs at most once per second per stream. Clusters still open, still in the local window, or pinned
        by a running question are kept until a later pass.
        """
        if retention_s <= 0 or stream_id not in self.engine.streams:
            return []
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_retention_s.get(stream_id, float("-inf")) < RETENTION_CHECK_INTERVAL_S:
            return []
        self._last_retention_s[stream_id] = now_s
        state = self.engine.stream(stream_id)
        if state.last_timestamp_s is None:
            return []
        expired = self.engine.drop_clusters_before(stream_id, state.last_timestamp_s - retention_s)
        for cluster_id in expired:
            if self._written.get(stream_id, {}).pop(cluster_id, None) is not None:
                self.publisher.enqueue(DeleteCluster(stream_id, cluster_id))
        return expired
