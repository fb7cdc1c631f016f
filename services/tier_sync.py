"""Keeps the metadata store in step with one worker's engine: cluster records, tier placement, retention.

The engine's ``TierManager`` enforces the budgets (spilling cold clusters device -> host -> disk and
fetching them back on demand); this class mirrors what it did into the store:

- **moves**: the engine's move listener only appends the committed ``Move`` to a list (no network I/O on
  the engine's hot path, which may be the middle of a question's retrieval). ``flush`` then applies each
  with ``MetadataStore.move_cluster``, an atomic compare-and-set of tier *and* location (a Lua script on
  Redis), so a reader never sees a tier with another placement's location;
- **cluster records**: ``flush`` diffs ``engine.clusters(stream)`` against what it last wrote and
  ``put_cluster``s new or grown clusters (one MULTI/EXEC with the time index) and deletes the ones that
  maintenance merged away;
- **retention**: sealed, unpinned clusters that ended before ``newest frame - retention_s`` are dropped from
  the engine and from the store.

All methods run on the worker's engine-loop thread, the only thread that touches the engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mosaic_core.bookkeeping.tiers import Move, Tier
from services.metadata.base import ClusterMeta, MetadataStore

log = logging.getLogger(__name__)
RETENTION_CHECK_INTERVAL_S = 1.0


@dataclass(slots=True, frozen=True)
class _Written:
    """What the store holds for one cluster (as far as this worker wrote it)."""

    stream_id: str
    tier: str
    end_s: float
    num_bytes: int
    last_frame: int


class TierSync:
    """Mirrors one engine's clusters into a ``MetadataStore``.

    Args:
        engine: the worker's engine; a move listener is attached to it.
        store: the metadata store shared with the router.
        worker_id: worker index, part of each cluster's location string.
    """

    def __init__(self, engine, store: MetadataStore, worker_id: str) -> None:
        self.engine = engine
        self.store = store
        self.worker_id = worker_id
        self._pending: list[Move] = []
        self._written: dict[str, _Written] = {}
        self._last_retention_s: dict[str, float] = {}
        self.num_moves_applied = 0
        engine.tiering.listeners.append(self._pending.append)

    def location(self, cluster_id: str, tier: Tier) -> str:
        """Where the bytes are: ``device:<worker>``, ``host:<worker>`` or ``disk:<file path>``."""
        if tier is Tier.DISK and self.engine.tiering.tiers.disk is not None:
            return f"disk:{self.engine.tiering.tiers.disk.path(cluster_id)}"
        return f"{tier.name.lower()}:{self.worker_id}"

    def flush(self, stream_ids) -> None:
        """Applies pending moves, then writes new, grown or merged-away clusters of ``stream_ids``."""
        moves, self._pending[:] = list(self._pending), []
        for move in moves:
            self._apply_move(move)
        for stream_id in stream_ids:
            if stream_id in self.engine.streams:
                self._reconcile(stream_id)

    def forget_stream(self, stream_id: str) -> None:
        """Drops what this worker remembers of a deleted stream (the store deletes its own records)."""
        for cluster_id in [c for c, w in self._written.items() if w.stream_id == stream_id]:
            del self._written[cluster_id]
        self._last_retention_s.pop(stream_id, None)

    def _apply_move(self, move: Move) -> None:
        written = self._written.get(move.cluster_id)
        if written is None:
            return  # not in the store yet: the next reconcile writes it with its current tier
        src, dst = move.src.name.lower(), move.dst.name.lower()
        moved = self.store.move_cluster(
            written.stream_id,
            move.cluster_id,
            from_tier=src,
            to_tier=dst,
            location=self.location(move.cluster_id, move.dst),
        )
        if moved:
            self.num_moves_applied += 1
            self._written[move.cluster_id] = _replace_tier(written, dst)
        else:
            # The store disagreed about the source tier (or the record is gone): rewrite it from the engine.
            log.warning("tier move %s %s->%s did not match the store; rewriting", move.cluster_id, src, dst)
            del self._written[move.cluster_id]

    def _reconcile(self, stream_id: str) -> None:
        infos = {info.cluster_id: info for info in self.engine.clusters(stream_id)}
        for cluster_id, info in infos.items():
            written = self._written.get(cluster_id)
            current = _Written(stream_id, info.tier, info.end_s, info.num_bytes, info.last_frame)
            if written == current:
                continue
            self.store.put_cluster(
                ClusterMeta(
                    cluster_id=cluster_id,
                    stream_id=stream_id,
                    start_s=info.start_s,
                    end_s=info.end_s,
                    first_frame=info.first_frame,
                    last_frame=info.last_frame,
                    num_tokens=info.num_tokens,
                    num_bytes=info.num_bytes,
                    tier=info.tier,
                    location=self.location(cluster_id, Tier[info.tier.upper()]),
                )
            )
            self._written[cluster_id] = current
        gone = [c for c, w in self._written.items() if w.stream_id == stream_id and c not in infos]
        for cluster_id in gone:
            self.store.delete_cluster(stream_id, cluster_id)
            del self._written[cluster_id]

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
            if self._written.pop(cluster_id, None) is not None:
                self.store.delete_cluster(stream_id, cluster_id)
        return expired


def _replace_tier(written: _Written, tier: str) -> _Written:
    return _Written(written.stream_id, tier, written.end_s, written.num_bytes, written.last_frame)
