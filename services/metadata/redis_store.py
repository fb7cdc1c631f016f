"""Redis metadata store: shared by the router and every worker, survives their restarts.

The key schema, field encoding, time-index and retention design are documented in ``schema.py``.
Redis errors (``redis.exceptions.ConnectionError``, ``TimeoutError``) propagate unchanged; the router maps
them to UNAVAILABLE. Clients made by ``redis_client`` (both stores' ``from_url``) raise ``TimeoutError`` when
Redis does not answer within their timeout, rather than holding the calling thread while it is frozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from mosaic_core.errors import ConfigError, UnknownStreamError
from services.metadata.base import ClusterMeta, MetadataStore, StreamRecord, validate_id
from services.metadata.schema import (
    APPLY_RETENTION_LUA,
    DEFAULT_NAMESPACE,
    DEFAULT_TIMEOUT_S,
    DELETE_STREAM_LUA,
    MAX_SPAN_FIELD,
    MOVE_CLUSTER_LUA,
    Keys,
    decode_cluster,
    decode_stream,
    encode_cluster,
    encode_stream,
)

T = TypeVar("T")
_DELETE_CHUNK_KEYS = 1024  # keys per DEL command, so one huge stream does not make one huge command
_WORKER = "{}"  # stands for a worker id in its streams set's key name (namespaces cannot hold braces)


def redis_client(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A client (``decode_responses=True``) of ``redis://host:port/db`` (or ``rediss://``, ``unix://``) that waits
    at most ``timeout_s`` to connect and for each reply, then raises ``redis.TimeoutError``: a Redis that stops
    answering (frozen, or cut off without a reset) costs a call that long, not its thread for the outage.

    One timeout fits every call because no command the stores send waits on the server (no BLPOP, XREAD or
    SUBSCRIBE: WatchEvents subscribers poll with short reads). No retries: a write that timed out may still land
    as Redis wakes, and a second try of the event script would issue a second event id.
    """
    if not timeout_s > 0:
        raise ConfigError(f"a Redis timeout must be > 0 seconds, got {timeout_s}")
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _score(value: float) -> str:
    return repr(float(value))


class RedisMetadataStore(MetadataStore):
    """``MetadataStore`` on one Redis primary.

    Args:
        client: a ``redis.Redis`` created with ``decode_responses=True``.
        namespace: key prefix, so several deployments can share a database.
        clock: wall-clock source for ``updated_s`` (seconds).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client.connection_pool.connection_kwargs.get("decode_responses", False):
            raise ConfigError("RedisMetadataStore needs a redis.Redis client with decode_responses=True")
        self._client = client
        self._keys = Keys(namespace)
        self._clock = clock
        self._move_script = client.register_script(MOVE_CLUSTER_LUA)
        self._delete_stream_script = client.register_script(DELETE_STREAM_LUA)
        self._retention_script = client.register_script(APPLY_RETENTION_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        clock: Callable[[], float] = time.time,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RedisMetadataStore:
        """Connects to ``redis://host:port/db`` (or ``rediss://``, ``unix://``) with ``redis_client``."""
        return cls(redis_client(url, timeout_s=timeout_s), namespace=namespace, clock=clock)

    @property
    def keys(self) -> Keys:
        return self._keys

    def close(self) -> None:
        self._client.close()

    # --- streams -----------------------------------------------------------------------------------

    def put_stream(self, record: StreamRecord, *, if_absent: bool = False) -> bool:
        key = self._keys.stream(record.stream_id)

        def write(pipe: Pipeline) -> bool:
            exists = pipe.exists(key)
            if exists and if_absent:
                return False
            old_worker = pipe.hget(key, "worker_id") or None
            pipe.multi()
            pipe.hset(key, mapping=encode_stream(record))
            if not exists:
                pipe.hset(key, MAX_SPAN_FIELD, _score(0.0))
            pipe.sadd(self._keys.streams(), record.stream_id)
            self._queue_assign(pipe, record.stream_id, old_worker, record.worker_id)
            pipe.execute()
            return True

        return self._atomic(write, key)

    def get_stream(self, stream_id: str) -> StreamRecord | None:
        fields = self._client.hgetall(self._keys.stream(stream_id))
        return decode_stream(fields) if fields else None

    def list_streams(self) -> list[StreamRecord]:
        stream_ids = sorted(self._client.smembers(self._keys.streams()))
        rows = self._read_hashes(self._keys.stream(s) for s in stream_ids)
        return [decode_stream(fields) for fields in rows if fields]

    def delete_stream(self, stream_id: str) -> bool:
        # One step on the server (schema.py, "Atomicity"): a concurrent put_cluster lands before it or fails after it.
        worker_prefix, worker_suffix = self._keys.worker_streams(_WORKER).split(_WORKER)
        deleted = self._delete_stream_script(
            keys=[self._keys.stream(stream_id), self._keys.tindex(stream_id), self._keys.streams()],
            args=[stream_id, self._keys.cluster(stream_id, ""), worker_prefix, worker_suffix, _DELETE_CHUNK_KEYS],
        )
        return bool(deleted)

    def set_worker(self, stream_id: str, worker_id: str | None) -> None:
        if worker_id is not None:
            validate_id("worker_id", worker_id)
        key = self._keys.stream(stream_id)

        def assign(pipe: Pipeline) -> None:
            if not pipe.exists(key):
                raise UnknownStreamError(f"unknown stream {stream_id!r}")
            old_worker = pipe.hget(key, "worker_id") or None
            pipe.multi()
            pipe.hset(key, "worker_id", worker_id or "")
            self._queue_assign(pipe, stream_id, old_worker, worker_id)
            pipe.execute()

        self._atomic(assign, key)

    def streams_on_worker(self, worker_id: str) -> list[str]:
        return sorted(self._client.smembers(self._keys.worker_streams(worker_id)))

    def assignments(self) -> dict[str, str]:
        stream_ids = sorted(self._client.smembers(self._keys.streams()))
        pipe = self._client.pipeline(transaction=False)
        for stream_id in stream_ids:
            pipe.hget(self._keys.stream(stream_id), "worker_id")
        return {s: w for s, w in zip(stream_ids, pipe.execute(), strict=True) if w}

    # --- clusters ----------------------------------------------------------------------------------

    def put_cluster(self, meta: ClusterMeta) -> None:
        stream_key = self._keys.stream(meta.stream_id)
        fields = encode_cluster(meta)
        fields["updated_s"] = _score(self._clock())
        span_s = meta.span_s

        def write(pipe: Pipeline) -> None:
            max_span = pipe.hget(stream_key, MAX_SPAN_FIELD)
            if max_span is None:
                raise UnknownStreamError(f"unknown stream {meta.stream_id!r} for cluster {meta.cluster_id!r}")
            pipe.multi()
            pipe.hset(self._keys.cluster(meta.stream_id, meta.cluster_id), mapping=fields)
            pipe.zadd(self._keys.tindex(meta.stream_id), {meta.cluster_id: meta.start_s})
            if span_s > float(max_span):
                pipe.hset(stream_key, MAX_SPAN_FIELD, _score(span_s))
            pipe.execute()

        # Watching the stream hash: a concurrent delete_stream (or a concurrent max_span_s raise) restarts us.
        self._atomic(write, stream_key)

    def get_cluster(self, stream_id: str, cluster_id: str) -> ClusterMeta | None:
        fields = self._client.hgetall(self._keys.cluster(stream_id, cluster_id))
        return decode_cluster(fields) if fields else None

    def list_clusters(self, stream_id: str) -> list[ClusterMeta]:
        cluster_ids = self._client.zrange(self._keys.tindex(stream_id), 0, -1)
        return self._read_clusters(stream_id, cluster_ids)

    def clusters_in_range(self, stream_id: str, start_s: float, end_s: float) -> list[ClusterMeta]:
        self._check_range(start_s, end_s)
        max_span = self._client.hget(self._keys.stream(stream_id), MAX_SPAN_FIELD)
        if max_span is None:
            return []
        lo = start_s - float(max_span)
        cluster_ids = self._client.zrangebyscore(self._keys.tindex(stream_id), _score(lo), _score(end_s))
        return [m for m in self._read_clusters(stream_id, cluster_ids) if m.end_s >= start_s]

    def move_cluster(self, stream_id: str, cluster_id: str, *, from_tier: str, to_tier: str, location: str) -> bool:
        self._check_move(from_tier, to_tier, location)
        moved = self._move_script(
            keys=[self._keys.cluster(stream_id, cluster_id)],
            args=[from_tier, to_tier, location, _score(self._clock())],
        )
        return bool(moved)

    def delete_cluster(self, stream_id: str, cluster_id: str) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._keys.cluster(stream_id, cluster_id))
        pipe.zrem(self._keys.tindex(stream_id), cluster_id)
        num_deleted, _ = pipe.execute()
        return num_deleted > 0

    def apply_retention(self, stream_id: str, now_s: float) -> list[str]:
        retention = self._client.hget(self._keys.stream(stream_id), "retention_s")
        if retention is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        if float(retention) <= 0:
            return []
        cutoff_s = now_s - float(retention)
        cluster_prefix = self._keys.cluster(stream_id, "")
        return list(
            self._retention_script(
                keys=[self._keys.tindex(stream_id)], args=[cluster_prefix, _score(cutoff_s), _DELETE_CHUNK_KEYS]
            )
        )

    # --- helpers -----------------------------------------------------------------------------------

    def _atomic(self, body: Callable[[Pipeline], T], *watched: str) -> T:
        """Runs ``body`` under WATCH of ``watched`` until its MULTI/EXEC commits (optimistic locking)."""
        with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    return body(pipe)
                except redis.WatchError:
                    continue  # another writer committed first; re-read and retry

    def _queue_assign(self, pipe: Pipeline, stream_id: str, old_worker: str | None, new_worker: str | None) -> None:
        if old_worker is not None and old_worker != new_worker:
            pipe.srem(self._keys.worker_streams(old_worker), stream_id)
        if new_worker is not None:
            pipe.sadd(self._keys.worker_streams(new_worker), stream_id)

    def _read_hashes(self, keys: Iterable[str]) -> list[dict[str, str]]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return pipe.execute()

    def _read_clusters(self, stream_id: str, cluster_ids: list[str]) -> list[ClusterMeta]:
        rows = self._read_hashes(self._keys.cluster(stream_id, c) for c in cluster_ids)
        # A cluster deleted between the index read and this one is simply absent from the answer.
        return [decode_cluster(fields) for fields in rows if fields]
