"""The metadata store interface: streams, clusters, their time index, tier placement and worker assignment.

Only metadata lives here. A cluster's KV bytes stay in the worker's memory pools; the store records where
they are (tier plus a location string such as ``"device:0"``, ``"host:0"`` or ``"disk:/var/kv/c17"``) so
that the router and a restarted worker can find them.

Semantics shared by every implementation (the contract tests check them against each one):

- ids are 1-128 characters of letters, digits and ``_ . - /`` starting with a letter or digit, so they can
  be embedded in ``:``-separated key names without ambiguity; a cluster id may have up to 160, since the engine
  names a cluster after its stream (``<stream id>/c<number>``);
- a cluster belongs to a stream that exists; ``put_cluster`` on an unknown stream raises;
- time ranges are closed: a cluster ``[start_s, end_s]`` overlaps ``[a, b]`` iff ``start_s <= b`` and
  ``end_s >= a``; results are ordered by ``(start_s, cluster_id)``;
- ``updated_s`` is stamped by the store's clock on every write of a cluster;
- ``move_cluster`` is a compare-and-set on the tier: tier and location change together or not at all.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass, field

from mosaic_core.errors import InvalidArgumentError, shown

TIERS = ("device", "host", "disk")
MAX_CENTROID_SUMMARY_FLOATS = 64
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]*")
MAX_ID_CHARS = 128
# "<stream id>/c<number>" (``mosaic_core.bookkeeping.formation``) of a 128-character stream id, with room for any number
MAX_CLUSTER_ID_CHARS = MAX_ID_CHARS + 32


def validate_id(kind: str, value: object, max_chars: int = MAX_ID_CHARS) -> str:
    """Returns ``value`` if it is a valid id, else raises ``InvalidArgumentError`` naming ``kind``."""
    if not isinstance(value, str) or len(value) > max_chars or not _ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind} {shown(value)} is invalid: use 1-{max_chars} letters, digits or '_.-/' starting with a letter "
            "or digit"
        )
    return value


def validate_tier(tier: object) -> str:
    """Returns ``tier`` if it names a tier, else raises ``InvalidArgumentError`` listing the valid ones."""
    if tier not in TIERS:
        raise InvalidArgumentError(f"tier {tier!r} is not one of {TIERS}")
    return tier  # type: ignore[return-value]


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name}={value!r} must be finite")


@dataclass(slots=True, kw_only=True)
class StreamRecord:
    """A registered stream as the router sees it.

    Attributes:
        stream_id: unique id.
        fps: frames per second kept from the stream (> 0).
        source_url: file path, http(s) or rtsp URL to pull from; ``None`` for pushed streams.
        loop_source: restart a file/URL source when it ends.
        retention_s: history kept, in seconds; 0 keeps everything.
        worker_id: worker index owning the stream's KV, ``None`` while unplaced.
        created_s: wall-clock creation time (Unix seconds).
        labels: free-form client labels.
    """

    stream_id: str
    fps: float
    source_url: str | None = None
    loop_source: bool = False
    retention_s: float = 0.0
    worker_id: str | None = None
    created_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id("stream_id", self.stream_id)
        if self.worker_id is not None:
            validate_id("worker_id", self.worker_id)
        _finite("fps", self.fps)
        _finite("retention_s", self.retention_s)
        if self.fps <= 0:
            raise InvalidArgumentError(f"fps={self.fps} must be > 0 (stream {self.stream_id!r})")
        if self.retention_s < 0:
            raise InvalidArgumentError(f"retention_s={self.retention_s} must be >= 0 (0 keeps everything)")
        if self.source_url == "":
            raise InvalidArgumentError("source_url must be None or non-empty")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()):
            raise InvalidArgumentError(f"labels must map str to str, got {self.labels!r}")


@dataclass(slots=True, kw_only=True)
class ClusterMeta:
    """Metadata of one KV cluster: its span, size, placement and a short summary vector.

    Attributes:
        cluster_id: id, unique within the stream.
        stream_id: owning stream.
        start_s: timestamp of the first frame in the cluster.
        end_s: timestamp of the last frame (>= start_s).
        first_frame: index of the first frame in the stream.
        last_frame: index of the last frame (>= first_frame).
        num_tokens: KV tokens held by the cluster.
        num_bytes: KV bytes over all layers.
        tier: one of ``TIERS``.
        location: where the bytes are, e.g. ``"host:0"``; opaque to the store.
        centroid_summary: at most 64 floats used for coarse cross-stream routing.
        updated_s: wall-clock time of the last write, stamped by the store.
    """

    cluster_id: str
    stream_id: str
    start_s: float
    end_s: float
    first_frame: int
    last_frame: int
    num_tokens: int
    num_bytes: int
    tier: str
    location: str
    centroid_summary: list[float] = field(default_factory=list)
    updated_s: float = 0.0

    def __post_init__(self) -> None:
        validate_id("cluster_id", self.cluster_id, MAX_CLUSTER_ID_CHARS)
        validate_id("stream_id", self.stream_id)
        validate_tier(self.tier)
        _finite("start_s", self.start_s)
        _finite("end_s", self.end_s)
        if self.end_s < self.start_s:
            raise InvalidArgumentError(f"cluster {self.cluster_id!r}: end_s={self.end_s} < start_s={self.start_s}")
        if not 0 <= self.first_frame <= self.last_frame:
            raise InvalidArgumentError(
                f"cluster {self.cluster_id!r}: need 0 <= first_frame={self.first_frame} <= last_frame={self.last_frame}"
            )
        if self.num_tokens < 0 or self.num_bytes < 0:
            raise InvalidArgumentError(
                f"cluster {self.cluster_id!r}: num_tokens={self.num_tokens} and num_bytes={self.num_bytes} must be >= 0"
            )
        if not self.location:
            raise InvalidArgumentError(f"cluster {self.cluster_id!r}: location must be non-empty")
        if len(self.centroid_summary) > MAX_CENTROID_SUMMARY_FLOATS:
            raise InvalidArgumentError(
                f"cluster {self.cluster_id!r}: centroid_summary has {len(self.centroid_summary)} floats, "
                f"at most {MAX_CENTROID_SUMMARY_FLOATS} allowed"
            )

    @property
    def span_s(self) -> float:
        return self.end_s - self.start_s


class MetadataStore(abc.ABC):
    """Where streams, cluster metadata and worker assignments live (in memory, or in Redis)."""

    # --- streams -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def put_stream(self, record: StreamRecord, *, if_absent: bool = False) -> bool:
        """Creates or replaces a stream record, keeping the worker index in step with ``worker_id``.

        Args:
            record: the stream.
            if_absent: only create; leave an existing record untouched.

        Returns:
            False if ``if_absent`` and the stream already existed, else True.
        """

    @abc.abstractmethod
    def get_stream(self, stream_id: str) -> StreamRecord | None:
        """Returns the stream, or None if it does not exist."""

    @abc.abstractmethod
    def list_streams(self) -> list[StreamRecord]:
        """Returns every stream, ordered by id."""

    @abc.abstractmethod
    def delete_stream(self, stream_id: str) -> bool:
        """Removes the stream, all its clusters, its time index and its worker assignment.

        Returns:
            False if the stream did not exist.
        """

    @abc.abstractmethod
    def set_worker(self, stream_id: str, worker_id: str | None) -> None:
        """Assigns the stream to a worker (None unassigns). Raises ``UnknownStreamError`` if unknown."""

    @abc.abstractmethod
    def streams_on_worker(self, worker_id: str) -> list[str]:
        """Returns the ids of the streams assigned to ``worker_id``, sorted."""

    @abc.abstractmethod
    def assignments(self) -> dict[str, str]:
        """Returns ``{stream_id: worker_id}`` for every assigned stream."""

    # --- clusters ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def put_cluster(self, meta: ClusterMeta) -> None:
        """Creates or replaces a cluster record and its time-index entry in one atomic step.

        Raises:
            UnknownStreamError: the cluster's stream does not exist.
        """

    @abc.abstractmethod
    def get_cluster(self, stream_id: str, cluster_id: str) -> ClusterMeta | None:
        """Returns the cluster, or None if it does not exist."""

    @abc.abstractmethod
    def list_clusters(self, stream_id: str) -> list[ClusterMeta]:
        """Returns every cluster of the stream ordered by ``(start_s, cluster_id)``; [] if unknown."""

    @abc.abstractmethod
    def clusters_in_range(self, stream_id: str, start_s: float, end_s: float) -> list[ClusterMeta]:
        """Returns the clusters overlapping the closed interval ``[start_s, end_s]``, ordered by start."""

    @abc.abstractmethod
    def move_cluster(self, stream_id: str, cluster_id: str, *, from_tier: str, to_tier: str, location: str) -> bool:
        """Atomically sets tier and location, only if the cluster's tier is currently ``from_tier``.

        Returns:
            True if moved; False if the cluster does not exist or is not in ``from_tier`` (nothing changes).
        """

    @abc.abstractmethod
    def delete_cluster(self, stream_id: str, cluster_id: str) -> bool:
        """Removes the cluster and its index entry. Returns False if it did not exist."""

    @abc.abstractmethod
    def apply_retention(self, stream_id: str, now_s: float) -> list[str]:
        """Drops clusters that ended before ``now_s - retention_s``; returns their ids sorted by start.

        A cluster that straddles the cutoff is kept. Streams with ``retention_s == 0`` keep everything.

        Raises:
            UnknownStreamError: the stream does not exist.
        """

    def close(self) -> None:  # noqa: B027 - optional hook; the in-memory store holds nothing to release
        """Releases connections. The store must not be used afterwards."""

    @staticmethod
    def _check_range(start_s: float, end_s: float) -> None:
        if math.isnan(start_s) or math.isnan(end_s) or end_s < start_s:
            raise InvalidArgumentError(f"time range [{start_s}, {end_s}] is empty or invalid")

    @staticmethod
    def _check_move(from_tier: str, to_tier: str, location: str) -> None:
        validate_tier(from_tier)
        validate_tier(to_tier)
        if not location:
            raise InvalidArgumentError("location must be non-empty")
