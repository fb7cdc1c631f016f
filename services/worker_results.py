"""What a worker's calls return: the small results the servicer and the coordinator turn into protos."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.metadata.base import StreamRecord
from services.push_sampling import SamplingGrid


@dataclass(slots=True)
class StreamInfo:
    """One stream as its worker sees it (converted to ``mosaic.v1.Stream`` by the servicer)."""

    record: StreamRecord
    frames_received: int
    frames_ingested: int
    frames_dropped: int
    num_clusters: int
    clusters_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]
    first_timestamp_s: float | None
    last_timestamp_s: float | None
    lag_s: float
    queue_frames: int
    source_state: int
    source_error: str


@dataclass(slots=True)
class FrameRejection:
    """Why one pushed frame was refused; ``code`` is the gRPC status name it would fail a call with."""

    index: int
    stream_id: str
    reason: str
    code: str = "INVALID_ARGUMENT"


@dataclass(slots=True)
class PushResult:
    """What became of pushed frames; ``needs_pixels`` lists those sent without pixels that their worker would keep,
    ``grids`` the sampling grids of the frames' streams as their worker left them (``services.push_sampling``)."""

    accepted: int = 0
    dropped: int = 0
    sampled_out: int = 0
    rejected: list[FrameRejection] = field(default_factory=list)
    needs_pixels: list[int] = field(default_factory=list)
    grids: dict[str, SamplingGrid] = field(default_factory=dict)


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    device: str
    num_streams: int
    free_bytes: int
    restored_streams: list[str]
    rss_bytes: int
    pid: int = 0
