"""What an engine holds, read without changing it: clusters, stream and engine statistics."""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.keyframe_store import held_keyframes
from mosaic_core.engine.results import ALLOCATOR_EVENTS, ClusterInfo, EngineStats, StreamStats
from mosaic_core.kernels import compiles


class IntrospectionMixin:
    """``Engine``'s read-only views, mixed into it: uses the engine's ``config``, ``model``, ``streams``,
    ``tiering`` and ``_keyframes_dropped_by_closed``, and ``stream`` (``StreamLifecycleMixin``)."""

    def clusters(self, stream_id: str) -> list[ClusterInfo]:
        """Clusters of a stream that hold KV (frames still in the local window are not in one yet)."""
        records = self.stream(stream_id).former.records_to_read()
        return [info for record in records if (info := self._cluster_info(record)) is not None]

    def cluster_info(self, stream_id: str, cluster_id: str) -> ClusterInfo | None:
        """One of ``clusters(stream_id)``, or None when the cluster is not among them (gone, or holding no KV yet)."""
        record = self.stream(stream_id).former.record_to_read(cluster_id)
        return None if record is None else self._cluster_info(record)

    def newest_cluster_ids(self, stream_id: str, count: int) -> list[str]:
        """The ids of the stream's last ``count`` clusters (the open one last): the only ones a new frame changes."""
        return [record.cluster_id for record in self.stream(stream_id).former.newest_to_read(count)]

    def _cluster_info(self, record: ClusterRecord) -> ClusterInfo | None:
        residency = self.tiering.residency
        if record.cluster_id not in residency:
            return None
        res = residency.record_to_read(record.cluster_id)
        return ClusterInfo(
            cluster_id=record.cluster_id,
            stream_id=record.stream_id,
            start_s=record.start_s,
            end_s=record.end_s,
            first_frame=record.frame_indices[0],
            last_frame=record.frame_indices[-1],
            num_tokens=res.summary.num_tokens,
            num_bytes=res.num_bytes,
            tier=res.tier.name.lower(),
        )

    def stream_stats(self, stream_id: str) -> StreamStats:
        state = self.stream(stream_id)
        usage = self.tiering.residency.stream_usage(stream_id)  # kept as clusters change: no walk of the history
        return StreamStats(
            stream_id=stream_id,
            fps=state.fps,
            frames_ingested=state.frames_ingested,
            first_timestamp_s=state.first_timestamp_s,
            last_timestamp_s=state.last_timestamp_s,
            num_clusters=sum(usage.clusters.values()),
            clusters_by_tier={tier.name.lower(): n for tier, n in usage.clusters.items()},
            bytes_by_tier={tier.name.lower(): n for tier, n in usage.num_bytes.items()},
            local_window_tokens=state.local_tokens,
            sink_tokens=state.sink_tokens,
            tokens_per_frame=None if state.geometry is None else state.geometry.tokens_per_frame,
            closed=state.closed,
        )

    def stats(self) -> EngineStats:
        residency = self.tiering.residency
        names = {tier: tier.name.lower() for tier in Tier}
        stores = [store for state in self.streams.values() if (store := held_keyframes(state)) is not None]
        growth = self.tiering.tiers.pools.host_growth
        return EngineStats(
            mode=self.config.mode.value,
            num_streams=len(self.streams),
            used_bytes_by_tier={names[t]: residency.used_bytes(t) for t in Tier},
            capacity_bytes_by_tier={names[t]: residency.capacity_bytes(t) for t in Tier},
            clusters_by_tier={names[t]: residency.num_clusters(t) for t in Tier},
            transfer_bytes_by_direction=dict(self.tiering.tiers.stats.bytes_by_direction),
            transfer_copies_by_direction=dict(self.tiering.tiers.stats.copies_by_direction),
            device_hit_ratio=self.tiering.hit_ratio,
            device_pool_bytes=self.tiering.tiers.pools.device_pool_bytes,
            keyframe_bytes=sum(s.num_bytes for s in stores),
            num_keyframes=sum(s.num_keyframes for s in stores),
            keyframes_dropped=self._keyframes_dropped_by_closed + sum(s.num_dropped for s in stores),
            allocator_events=_allocator_events(self.model.device),
            kernel_compiles=compiles.total(),
            host_chunks_ahead=growth.ahead_chunks,
            host_chunks_sync=growth.sync_chunks,
            host_grow_wait_s=growth.wait_s,
            host_pool_bytes=self.tiering.tiers.pools.host_pool_bytes,
        )


def _allocator_events(device: torch.device) -> dict[str, int]:
    """``EngineStats.allocator_events`` on ``device`` (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    counts = torch.cuda.memory_stats(device)
    return {name: int(counts.get(key, 0)) for name, key in ALLOCATOR_EVENTS.items()}
