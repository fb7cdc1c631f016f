"""The embedded metadata store shared across processes: an ``InMemoryMetadataStore`` inside a Ray actor.

Without ``--redis-url`` the router and every worker still need one store (workers write cluster placement,
the router reads streams, a restarted worker reads its streams back). A named Ray actor holds the in-memory
store; ``RayMetadataStore`` is the ``MetadataStore`` proxy each process uses. The proxy pickles as the
actor's *name*, not its handle: Ray can only restart a worker whose constructor arguments are plain values.
The actor lives as long as the router's Ray job, so it survives worker restarts but not the router; Redis
is the choice when metadata must outlive the router.
"""

from __future__ import annotations

import uuid

import ray

from services.errors import unwrap
from services.metadata.base import ClusterMeta, MetadataStore, StreamRecord
from services.metadata.memory import InMemoryMetadataStore

STORE_ACTOR_NAME = "mosaic-metadata"
_METHODS = (
    "put_stream",
    "get_stream",
    "list_streams",
    "delete_stream",
    "set_worker",
    "streams_on_worker",
    "assignments",
    "put_cluster",
    "get_cluster",
    "list_clusters",
    "clusters_in_range",
    "move_cluster",
    "delete_cluster",
    "apply_retention",
)


@ray.remote(num_cpus=0, max_concurrency=4)
class MetadataStoreActor:
    """Hosts one ``InMemoryMetadataStore`` (thread-safe, so concurrent calls are fine)."""

    def __init__(self) -> None:
        self._store = InMemoryMetadataStore()

    def call(self, method: str, args: tuple, kwargs: dict):
        if method not in _METHODS:
            raise AttributeError(f"metadata store has no method {method!r}")
        return getattr(self._store, method)(*args, **kwargs)


class RayMetadataStore(MetadataStore):
    """``MetadataStore`` whose calls run in a ``MetadataStoreActor`` (blocking; call off the event loop).

    Args:
        name: the actor's name in the Ray namespace; the handle is looked up on first use.
        actor: the handle, when the caller already has it.
    """

    def __init__(self, name: str, actor=None) -> None:
        self.name = name
        self._actor = actor

    @classmethod
    def start(cls) -> RayMetadataStore:
        name = f"{STORE_ACTOR_NAME}-{uuid.uuid4().hex[:12]}"
        return cls(name, MetadataStoreActor.options(name=name).remote())

    @property
    def actor(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.name)
        return self._actor

    def __reduce__(self):
        return (RayMetadataStore, (self.name,))

    def _call(self, method: str, *args, **kwargs):
        try:
            return ray.get(self.actor.call.remote(method, args, kwargs))
        except ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None

    def put_stream(self, record: StreamRecord, *, if_absent: bool = False) -> bool:
        return self._call("put_stream", record, if_absent=if_absent)

    def get_stream(self, stream_id: str) -> StreamRecord | None:
        return self._call("get_stream", stream_id)

    def list_streams(self) -> list[StreamRecord]:
        return self._call("list_streams")

    def delete_stream(self, stream_id: str) -> bool:
        return self._call("delete_stream", stream_id)

    def set_worker(self, stream_id: str, worker_id: str | None) -> None:
        return self._call("set_worker", stream_id, worker_id)

    def streams_on_worker(self, worker_id: str) -> list[str]:
        return self._call("streams_on_worker", worker_id)

    def assignments(self) -> dict[str, str]:
        return self._call("assignments")

    def put_cluster(self, meta: ClusterMeta) -> None:
        return self._call("put_cluster", meta)

    def get_cluster(self, stream_id: str, cluster_id: str) -> ClusterMeta | None:
        return self._call("get_cluster", stream_id, cluster_id)

    def list_clusters(self, stream_id: str) -> list[ClusterMeta]:
        return self._call("list_clusters", stream_id)

    def clusters_in_range(self, stream_id: str, start_s: float, end_s: float) -> list[ClusterMeta]:
        return self._call("clusters_in_range", stream_id, start_s, end_s)

    def move_cluster(self, stream_id: str, cluster_id: str, *, from_tier: str, to_tier: str, location: str) -> bool:
        return self._call(
            "move_cluster", stream_id, cluster_id, from_tier=from_tier, to_tier=to_tier, location=location
        )

    def delete_cluster(self, stream_id: str, cluster_id: str) -> bool:
        return self._call("delete_cluster", stream_id, cluster_id)

    def apply_retention(self, stream_id: str, now_s: float) -> list[str]:
        return self._call("apply_retention", stream_id, now_s)


def connect_store(redis_url: str, *, namespace: str, timeout_s: float) -> MetadataStore:
    """The Redis store at ``redis_url`` (each process connects itself: a Redis client does not pickle); a call
    Redis does not answer within ``timeout_s`` raises ``redis.TimeoutError``."""
    from services.metadata.redis_store import RedisMetadataStore

    return RedisMetadataStore.from_url(redis_url, namespace=namespace, timeout_s=timeout_s)
