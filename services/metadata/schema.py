"""Redis key schema and hash-field encoding of the metadata store.

Every key starts with a namespace prefix ``{ns}`` (default ``mosaic``) so several deployments, or tests,
can share one Redis database. Ids never contain ``:`` (see ``base.validate_id``), so each key name parses
back unambiguously.

==========================================  ====  ============================================================
key                                         type  content
==========================================  ====  ============================================================
``{ns}:streams``                            set   ids of every registered stream
``{ns}:stream:{stream_id}``                 hash  ``STREAM_FIELDS`` plus ``max_span_s``
``{ns}:stream:{stream_id}:tindex``          zset  member ``cluster_id``, score ``start_s``: the stream's
                                                  cluster list and its time index in one
``{ns}:cluster:{stream_id}:{cluster_id}``   hash  ``CLUSTER_FIELDS``
``{ns}:worker:{worker_id}:streams``         set   ids of the streams assigned to the worker
``{ns}:watches``, ``{ns}:watch:...``        ...   standing questions and their events: ``watches.py``
                                                  documents them and lists them in ``WATCH_KEY_TEMPLATES``
==========================================  ====  ============================================================

Why one zset and no separate cluster set: the time index already holds every cluster id of the stream, and
one index is one thing to keep consistent. ``list_clusters`` reads it in time order.

**End-time handling.** The zset is scored by ``start_s`` only, but overlap with ``[a, b]`` also needs
``end_s >= a``. The stream hash keeps ``max_span_s``, an upper bound on ``end_s - start_s`` over every
cluster written (raised in the same MULTI/EXEC as the cluster write, never lowered; a stale-high bound
costs only a few extra reads). Every overlapping cluster therefore starts in ``[a - max_span_s, b]``:
``ZRANGEBYSCORE tindex (a - max_span_s) b`` gives a small superset, and ``end_s`` from each cluster
hash filters it exactly. Clusters are capped in size by the engine, so the superset stays small.

**Retention.** A live stream keeps growing, so Redis ``EXPIRE`` (a per-key TTL fixed at write time) cannot
express "keep the last ``retention_s`` seconds of the stream's own clock". ``apply_retention(now_s)``
instead takes ``ZRANGEBYSCORE tindex -inf (cutoff`` (clusters starting before ``cutoff = now_s -
retention_s``), keeps those whose ``end_s`` reaches the cutoff, and deletes the rest (hash and zset entry)
in one step, the Lua script ``APPLY_RETENTION_LUA``. Nothing in the schema carries a TTL.

**Atomicity.** Multi-key writes (``put_cluster`` = cluster hash + zset + ``max_span_s``; ``put_stream``;
``set_worker``) are MULTI/EXEC transactions, under WATCH where they depend on what they read. ``delete_stream`` is
the Lua script ``DELETE_STREAM_LUA``: it reads the stream's index and deletes the stream, its index and every
cluster the index names in one step, so no ``put_cluster`` can add a cluster between the read and the deletes.
Retention is the Lua script ``APPLY_RETENTION_LUA`` for the same reason. (Under WATCH, a writer adding clusters
without pause restarted those reads again and again, each time longer, without end.) A placement change
(``move_cluster``) is the Lua script ``MOVE_CLUSTER_LUA``, run with EVALSHA: it compares the current tier and sets
``tier``, ``location`` and ``updated_s`` in one step, so readers (HGETALL is atomic) never see a tier with another
placement's location. The schema targets one Redis primary (optionally with replicas or Sentinel), not Redis
Cluster: the global ``{ns}:streams`` set takes part in multi-key transactions with per-stream keys.

**Hash fields.** Stream hash: ``stream_id, fps, source_url, loop_source, retention_s, worker_id,
created_s, labels`` (the StreamRecord) and ``max_span_s`` (store-managed). Cluster hash: ``cluster_id,
stream_id, start_s, end_s, first_frame, last_frame, num_tokens, num_bytes, tier, location,
centroid_summary, updated_s`` (the ClusterMeta).

**Field encoding.** Hash fields are strings chosen to round-trip exactly and to read well in
``redis-cli``: floats as ``repr`` (shortest round-trip form; ``inf``/``nan`` included), ints in decimal,
bools as ``0``/``1``, optional strings as ``""`` for None, and the labels dict and the centroid list as
JSON. Every field of the record is always written, so a write replaces the whole record.
"""

from __future__ import annotations

import json
import re

from mosaic_core.errors import InvalidArgumentError
from services.metadata.base import ClusterMeta, StreamRecord

DEFAULT_NAMESPACE = "mosaic"
# The default of ServiceConfig.redis_timeout_s: seconds a Redis client of the service waits to connect and per reply.
DEFAULT_TIMEOUT_S = 5.0

# The documented key templates, in the table's order; tests match every key in Redis against them.
KEY_TEMPLATES = (
    "{ns}:streams",
    "{ns}:stream:{stream_id}",
    "{ns}:stream:{stream_id}:tindex",
    "{ns}:cluster:{stream_id}:{cluster_id}",
    "{ns}:worker:{worker_id}:streams",
)

STREAM_FIELDS = (
    "stream_id",
    "fps",
    "source_url",
    "loop_source",
    "retention_s",
    "worker_id",
    "created_s",
    "labels",
)
MAX_SPAN_FIELD = "max_span_s"
CLUSTER_FIELDS = (
    "cluster_id",
    "stream_id",
    "start_s",
    "end_s",
    "first_frame",
    "last_frame",
    "num_tokens",
    "num_bytes",
    "tier",
    "location",
    "centroid_summary",
    "updated_s",
)

# KEYS[1] = cluster hash; ARGV = from_tier, to_tier, location, updated_s. Returns 1 if moved, else 0.
# HGET on a missing hash returns false, which never equals a tier, so a deleted cluster is never recreated.
MOVE_CLUSTER_LUA = """
if redis.call('HGET', KEYS[1], 'tier') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'tier', ARGV[2], 'location', ARGV[3], 'updated_s', ARGV[4])
return 1
"""

# KEYS: the stream hash, its tindex, the streams set. ARGV: the stream id; the prefix of its cluster keys; the prefix
# and suffix of a worker's streams set; the keys a DEL command takes at most.
DELETE_STREAM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local worker = redis.call('HGET', KEYS[1], 'worker_id')
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local chunk_keys = tonumber(ARGV[5])
for first = 1, #ids, chunk_keys do
  local chunk = {}
  for i = first, math.min(first + chunk_keys - 1, #ids) do
    chunk[#chunk + 1] = ARGV[2] .. ids[i]
  end
  redis.call('DEL', unpack(chunk))
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
if worker and worker ~= '' then
  redis.call('SREM', ARGV[3] .. worker .. ARGV[4], ARGV[1])
end
return 1
"""

# KEYS[1] the stream's time index; ARGV[1] its clusters' key prefix, ARGV[2] the cutoff (a float's repr), ARGV[3]
# keys per DEL. Returns the expired cluster ids: those starting before the cutoff whose end_s is before it too.
APPLY_RETENTION_LUA = """
local cutoff = tonumber(ARGV[2])
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])) do
  local end_s = tonumber(redis.call('HGET', ARGV[1] .. id, 'end_s') or '')
  if end_s and end_s < cutoff then
    expired[#expired + 1] = id
  end
end
local chunk_keys = tonumber(ARGV[3])
for first = 1, #expired, chunk_keys do
  local keys, ids = {}, {}
  for i = first, math.min(first + chunk_keys - 1, #expired) do
    keys[#keys + 1] = ARGV[1] .. expired[i]
    ids[#ids + 1] = expired[i]
  end
  redis.call('DEL', unpack(keys))
  redis.call('ZREM', KEYS[1], unpack(ids))
end
return expired
"""

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Keys:
    """Builds the key names of one namespace."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not _NAMESPACE_RE.fullmatch(namespace):
            raise InvalidArgumentError(f"namespace {namespace!r} must be 1-64 of [A-Za-z0-9_.-]")
        self.namespace = namespace

    def streams(self) -> str:
        return f"{self.namespace}:streams"

    def stream(self, stream_id: str) -> str:
        return f"{self.namespace}:stream:{stream_id}"

    def tindex(self, stream_id: str) -> str:
        return f"{self.namespace}:stream:{stream_id}:tindex"

    def cluster(self, stream_id: str, cluster_id: str) -> str:
        return f"{self.namespace}:cluster:{stream_id}:{cluster_id}"

    def worker_streams(self, worker_id: str) -> str:
        return f"{self.namespace}:worker:{worker_id}:streams"


def template_regex(template: str, namespace: str) -> re.Pattern[str]:
    """Compiles a ``KEY_TEMPLATES`` entry into a regex matching concrete key names of ``namespace``."""
    parts = re.split(r"(\{[a-z_]+\})", template)
    out = []
    for part in parts:
        if part == "{ns}":
            out.append(re.escape(namespace))
        elif part.startswith("{"):
            out.append(r"[A-Za-z0-9][A-Za-z0-9_./-]*")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def _f(value: float) -> str:
    return repr(float(value))


def encode_stream(record: StreamRecord) -> dict[str, str]:
    """Hash fields of a stream record (without the store-managed ``max_span_s``)."""
    return {
        "stream_id": record.stream_id,
        "fps": _f(record.fps),
        "source_url": record.source_url or "",
        "loop_source": "1" if record.loop_source else "0",
        "retention_s": _f(record.retention_s),
        "worker_id": record.worker_id or "",
        "created_s": _f(record.created_s),
        "labels": json.dumps(record.labels, sort_keys=True, separators=(",", ":")),
    }


def decode_stream(fields: dict[str, str]) -> StreamRecord:
    """Inverse of ``encode_stream``; extra fields (``max_span_s``) are ignored."""
    return StreamRecord(
        stream_id=fields["stream_id"],
        fps=float(fields["fps"]),
        source_url=fields["source_url"] or None,
        loop_source=fields["loop_source"] == "1",
        retention_s=float(fields["retention_s"]),
        worker_id=fields["worker_id"] or None,
        created_s=float(fields["created_s"]),
        labels=json.loads(fields["labels"]),
    )


def encode_cluster(meta: ClusterMeta) -> dict[str, str]:
    """Hash fields of a cluster record."""
    return {
        "cluster_id": meta.cluster_id,
        "stream_id": meta.stream_id,
        "start_s": _f(meta.start_s),
        "end_s": _f(meta.end_s),
        "first_frame": str(int(meta.first_frame)),
        "last_frame": str(int(meta.last_frame)),
        "num_tokens": str(int(meta.num_tokens)),
        "num_bytes": str(int(meta.num_bytes)),
        "tier": meta.tier,
        "location": meta.location,
        "centroid_summary": json.dumps([float(x) for x in meta.centroid_summary], separators=(",", ":")),
        "updated_s": _f(meta.updated_s),
    }


def decode_cluster(fields: dict[str, str]) -> ClusterMeta:
    """Inverse of ``encode_cluster``."""
    return ClusterMeta(
        cluster_id=fields["cluster_id"],
        stream_id=fields["stream_id"],
        start_s=float(fields["start_s"]),
        end_s=float(fields["end_s"]),
        first_frame=int(fields["first_frame"]),
        last_frame=int(fields["last_frame"]),
        num_tokens=int(fields["num_tokens"]),
        num_bytes=int(fields["num_bytes"]),
        tier=fields["tier"],
        location=fields["location"],
        centroid_summary=json.loads(fields["centroid_summary"]),
        updated_s=float(fields["updated_s"]),
    )
