"""Turns one worker's engine changes into metadata ops for the write-behind publisher; applies retention.

Runs on the worker's engine-loop thread, the only thread that touches the engine, and does no network I/O:

- **clusters**: ``flush`` diffs ``engine.clusters(stream)`` against what it last published and enqueues a put
  for each new, grown or moved cluster (tier and location change together in one record) and a delete for
  each cluster maintenance merged away. Tier moves only mark their stream for the next diff;
- **retention**: sealed, unpinned clusters that ended before ``newest frame - retention_s`` are dropped from
  the engine (and so from its durable history) and their records deleted from the store.

``snapshot`` gives the publisher the whole current view when the store must be rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mosaic_core.bookkeeping.tiers import Move, Tier
from services.metadata.base import ClusterMeta
from services.publisher import DeleteCluster, MetadataPublisher, PutCluster

RETENTION_CHECK_INTERVAL_S = 1.0


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
        engine: the worker's engine; a move listener is attached to it.
        publisher: applies the ops off this thread.
        worker_id: worker index, part of each cluster's location string.
    """

    def __init__(self, engine, publisher: MetadataPublisher, worker_id: str) -> None:
        self.engine = engine
        self.publisher = publisher
        self.worker_id = worker_id
        self._moved_streams: set[str] = set()
        self._written: dict[str, dict[str, _Written]] = {}  # stream -> cluster -> what was last published
        self._last_retention_s: dict[str, float] = {}
        engine.tiering.listeners.append(self._on_move)

    def location(self, tier: Tier) -> str:
        """Where the bytes are: ``device:<worker>``, ``host:<worker>`` or ``disk:<worker>``."""
        return f"{tier.name.lower()}:{self.worker_id}"

    def flush(self, stream_ids) -> None:
        """Publishes new, grown, moved or merged-away clusters of ``stream_ids`` and of streams with moves."""
        streams, self._moved_streams = set(stream_ids) | self._moved_streams, set()
        for stream_id in streams:
            if stream_id in self.engine.streams:
                self._diff(stream_id)

    def forget_stream(self, stream_id: str) -> None:
        """Drops what this worker remembers of a deleted stream (the publisher deletes its records)."""
        self._written.pop(stream_id, None)
        self._last_retention_s.pop(stream_id, None)
        self._moved_streams.discard(stream_id)

    def cluster_metas(self, stream_id: str) -> list[ClusterMeta]:
        """The stream's clusters as the store records them (engine thread)."""
        return [self._meta(stream_id, info) for info in self.engine.clusters(stream_id)]

    def _on_move(self, move: Move) -> None:
        self._moved_streams.add(move.cluster_id.rsplit("/", 1)[0])

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

    def _diff(self, stream_id: str) -> None:
        infos = {info.cluster_id: info for info in self.engine.clusters(stream_id)}
        written = self._written.setdefault(stream_id, {})
        for cluster_id, info in infos.items():
            current = _Written(info.tier, info.end_s, info.num_bytes, info.last_frame)
            if written.get(cluster_id) != current:
                self.publisher.enqueue(PutCluster(self._meta(stream_id, info)))
                written[cluster_id] = current
        for cluster_id in [c for c in written if c not in infos]:
            self.publisher.enqueue(DeleteCluster(stream_id, cluster_id))
            del written[cluster_id]

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
