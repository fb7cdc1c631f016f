"""Where watches and their recent events live: in Redis (durable) or in the router's memory.

Only the router uses this store (workers get their watches from the router), so the in-memory store needs no
actor: without ``--redis-url`` watches last as long as the router process.

Semantics shared by both implementations (``tests/integration/test_watch_store.py`` runs the same tests on each):

- event ids come from one counter per deployment, so they increase across watches and never repeat, also
  after a restart (Redis keeps the counter); a subscriber to several watches resumes from one number;
- each watch keeps its newest ``max_events`` events; ``append_event`` trims the oldest and reports how many
  it trimmed, and remembers the newest trimmed id (``trimmed_through``) so a resuming reader learns it missed some;
- ``fired_until`` is the end (stream clock) of the watch's newest event per stream, for cooldowns that
  outlive a worker restart;
- the store carries an epoch (``claim_epoch``): a token its first router sets and every router remembers. A
  Redis that restarts without its data comes back without it, which tells the routers to write back the watches
  they hold (``restore``): without it, the emptied store would read as every watch deleted.

Redis keys (namespace ``{ns}`` as in ``schema.py``; listed in ``WATCH_KEY_TEMPLATES``):

==================================  ====  =============================================================
``{ns}:watches``                    set   watch ids
``{ns}:watch:{watch_id}``           hash  ``record``: the ``WatchRecord`` as JSON
``{ns}:watch:{watch_id}:events``    zset  score event id, member ``"{id}|{event JSON}"``
``{ns}:watch:{watch_id}:state``     hash  ``num_events``, ``last_event_unix_s``, ``trimmed_through``,
                                          ``fired:{stream_id}``
``{ns}:watch_seq``                  str   the last event id issued
``{ns}:watch_epoch``                str   the store's epoch token
==================================  ====  =============================================================
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field

from mosaic_core.errors import MosaicError
from services.metadata.schema import DEFAULT_TIMEOUT_S
from services.watches_spec import ActiveHours, WatchRecord

log = logging.getLogger(__name__)

WATCH_KEY_TEMPLATES = (
    "{ns}:watches",
    "{ns}:watch:{watch_id}",
    "{ns}:watch:{watch_id}:events",
    "{ns}:watch:{watch_id}:state",
    "{ns}:watch_seq",
    "{ns}:watch_epoch",
)
CLAIM_EPOCH_LUA = """
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""
RAISE_SEQ_LUA = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""
APPEND_EVENT_LUA = """
if redis.call('EXISTS', KEYS[4]) == 0 then return {0, 0} end
local id = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], id, id .. '|' .. ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
local trimmed = 0
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1, 'WITHSCORES')
  trimmed = #old / 2
  redis.call('HSET', KEYS[3], 'trimmed_through', old[#old])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
redis.call('HINCRBY', KEYS[3], 'num_events', 1)
redis.call('HSET', KEYS[3], 'last_event_unix_s', ARGV[5])
if ARGV[6] == '1' then redis.call('HSET', KEYS[3], 'fired:' .. ARGV[3], ARGV[4]) end
return {id, trimmed}
"""


@dataclass(slots=True)
class WatchState:
    """What happened to a watch so far."""

    num_events: int = 0
    last_event_unix_s: float = 0.0
    trimmed_through: int = 0
    fired_until_s: dict[str, float] = field(default_factory=dict)


def encode_watch(record: WatchRecord) -> str:
    return json.dumps(dataclasses.asdict(record), sort_keys=True, separators=(",", ":"))


def decode_watch(text: str) -> WatchRecord:
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise ValueError(f"a watch record is a JSON object, not {type(fields).__name__}")
    hours = fields.pop("active_hours", None)
    return WatchRecord(**fields, active_hours=None if hours is None else ActiveHours(**hours))


class WatchStore(abc.ABC):
    """Watches, their state and a bounded buffer of recent events per watch."""

    @abc.abstractmethod
    def put_watch(self, record: WatchRecord) -> bool:
        """Creates the watch; False (nothing changes) if its id is taken."""

    @abc.abstractmethod
    def get_watch(self, watch_id: str) -> WatchRecord | None: ...

    @abc.abstractmethod
    def list_watches(self) -> list[WatchRecord]:
        """Every watch, ordered by id."""

    @abc.abstractmethod
    def delete_watch(self, watch_id: str) -> bool:
        """Removes the watch, its state and its events; False if unknown."""

    @abc.abstractmethod
    def state(self, watch_id: str) -> WatchState: ...

    @abc.abstractmethod
    def append_event(
        self, watch_id: str, event: dict, *, max_events: int, sets_cooldown: bool = True
    ) -> tuple[int, int] | None:
        """Stores ``event`` under a new id; with ``sets_cooldown`` its ``stream_id`` and ``end_s`` feed
        ``fired_until`` (the router passes False for an event whose stream may have been deleted since).

        Returns ``(event_id, events trimmed)``, or None if the watch no longer exists."""

    @abc.abstractmethod
    def events_after(self, watch_id: str, after_id: int, limit: int) -> list[tuple[int, dict]]:
        """Up to ``limit`` buffered events with id > ``after_id``, oldest first."""

    @abc.abstractmethod
    def forget_stream(self, stream_id: str) -> None:
        """Drops every watch's cooldown for the stream (``fired_until_s``): it was deleted, and a stream created
        again under its id, whose clock may start again at 0, starts afresh."""

    @abc.abstractmethod
    def last_event_id(self) -> int:
        """The newest id issued (0 before the first event)."""

    @abc.abstractmethod
    def claim_epoch(self, token: str) -> str:
        """The store's epoch: ``token`` if the store had none (it is new, or lost its data), else the one it has."""

    @abc.abstractmethod
    def restore(self, records: list[WatchRecord], last_event_id: int) -> list[str]:
        """After the store lost its data: writes back those of ``records`` it lacks, each marked as having dropped
        its events up to ``last_event_id`` (a resuming reader learns it missed some), and raises the event counter
        to at least ``last_event_id``, so ids still never repeat. Returns the ids written back."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


class InMemoryWatchStore(WatchStore):
    """``WatchStore`` in this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[str, WatchRecord] = {}
        self._states: dict[str, WatchState] = {}
        self._events: dict[str, list[tuple[int, dict]]] = {}
        self._seq = 0
        self._epoch = ""

    def put_watch(self, record: WatchRecord) -> bool:
        with self._lock:
            if record.watch_id in self._watches:
                return False
            self._watches[record.watch_id] = decode_watch(encode_watch(record))
            self._states[record.watch_id] = WatchState()
            self._events[record.watch_id] = []
            return True

    def get_watch(self, watch_id: str) -> WatchRecord | None:
        with self._lock:
            record = self._watches.get(watch_id)
            return None if record is None else decode_watch(encode_watch(record))

    def list_watches(self) -> list[WatchRecord]:
        with self._lock:
            return [decode_watch(encode_watch(self._watches[w])) for w in sorted(self._watches)]

    def delete_watch(self, watch_id: str) -> bool:
        with self._lock:
            self._states.pop(watch_id, None)
            self._events.pop(watch_id, None)
            return self._watches.pop(watch_id, None) is not None

    def state(self, watch_id: str) -> WatchState:
        with self._lock:
            state = self._states.get(watch_id) or WatchState()
            return dataclasses.replace(state, fired_until_s=dict(state.fired_until_s))

    def append_event(
        self, watch_id: str, event: dict, *, max_events: int, sets_cooldown: bool = True
    ) -> tuple[int, int] | None:
        with self._lock:
            if watch_id not in self._watches:
                return None
            self._seq += 1
            events, state = self._events[watch_id], self._states[watch_id]
            events.append((self._seq, json.loads(json.dumps(event))))
            trimmed = max(0, len(events) - max_events)
            if trimmed:
                state.trimmed_through = events[trimmed - 1][0]
                del events[:trimmed]
            state.num_events += 1
            state.last_event_unix_s = float(event.get("fired_unix_s", 0.0))
            if sets_cooldown:
                state.fired_until_s[event["stream_id"]] = float(event["end_s"])
            return self._seq, trimmed

    def events_after(self, watch_id: str, after_id: int, limit: int) -> list[tuple[int, dict]]:
        with self._lock:
            return [(i, dict(e)) for i, e in self._events.get(watch_id, []) if i > after_id][:limit]

    def forget_stream(self, stream_id: str) -> None:
        with self._lock:
            for state in self._states.values():
                state.fired_until_s.pop(stream_id, None)

    def last_event_id(self) -> int:
        with self._lock:
            return self._seq

    def claim_epoch(self, token: str) -> str:
        with self._lock:
            self._epoch = self._epoch or token
            return self._epoch

    def restore(self, records: list[WatchRecord], last_event_id: int) -> list[str]:
        restored = [r.watch_id for r in records if self.put_watch(r)]
        with self._lock:
            for watch_id in restored:
                self._states[watch_id].trimmed_through = last_event_id
            self._seq = max(self._seq, last_event_id)
        return restored


class RedisWatchStore(WatchStore):
    """``WatchStore`` in Redis, next to the metadata store's keys (same client settings and namespace)."""

    def __init__(self, client, *, namespace: str) -> None:
        self._client = client
        self._ns = namespace
        self._append = client.register_script(APPEND_EVENT_LUA)
        self._claim_epoch = client.register_script(CLAIM_EPOCH_LUA)
        self._raise_seq = client.register_script(RAISE_SEQ_LUA)

    @classmethod
    def from_url(cls, url: str, *, namespace: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RedisWatchStore:
        """Connects with ``redis_store.redis_client``: a call to a Redis that stops answering raises
        ``redis.TimeoutError`` after ``timeout_s``."""
        from services.metadata.redis_store import redis_client

        return cls(redis_client(url, timeout_s=timeout_s), namespace=namespace)

    def _key(self, watch_id: str, part: str = "") -> str:
        return f"{self._ns}:watch:{watch_id}" + (f":{part}" if part else "")

    def put_watch(self, record: WatchRecord) -> bool:
        pipe = self._client.pipeline(transaction=True)  # both or neither: an id taken but never listed is lost
        pipe.hsetnx(self._key(record.watch_id), "record", encode_watch(record))
        pipe.sadd(f"{self._ns}:watches", record.watch_id)  # a taken id is listed already (or, once, repaired)
        created, _ = pipe.execute()
        return bool(created)

    def get_watch(self, watch_id: str) -> WatchRecord | None:
        text = self._client.hget(self._key(watch_id), "record")
        return None if text is None else decode_watch(text)

    def list_watches(self) -> list[WatchRecord]:
        ids = sorted(self._client.smembers(f"{self._ns}:watches"))
        pipe = self._client.pipeline(transaction=False)
        for watch_id in ids:
            pipe.hget(self._key(watch_id), "record")
        records = []
        for watch_id, text in zip(ids, pipe.execute(), strict=True):
            if text is None:
                continue
            try:
                records.append(decode_watch(text))
            except (ValueError, TypeError, MosaicError) as err:  # one bad record costs itself, not the router's start
                log.error("watch %r in the store cannot be read and is skipped: %s", watch_id, err)
        return records

    def delete_watch(self, watch_id: str) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._key(watch_id))
        pipe.delete(self._key(watch_id, "events"), self._key(watch_id, "state"))
        pipe.srem(f"{self._ns}:watches", watch_id)
        deleted, *_ = pipe.execute()
        return deleted > 0

    def state(self, watch_id: str) -> WatchState:
        fields = self._client.hgetall(self._key(watch_id, "state"))
        return WatchState(
            num_events=int(fields.get("num_events", 0)),
            last_event_unix_s=float(fields.get("last_event_unix_s", 0.0)),
            trimmed_through=int(float(fields.get("trimmed_through", 0))),
            fired_until_s={k[len("fired:") :]: float(v) for k, v in fields.items() if k.startswith("fired:")},
        )

    def append_event(
        self, watch_id: str, event: dict, *, max_events: int, sets_cooldown: bool = True
    ) -> tuple[int, int] | None:
        keys = [
            f"{self._ns}:watch_seq",
            self._key(watch_id, "events"),
            self._key(watch_id, "state"),
            self._key(watch_id),
        ]
        payload = json.dumps(event, sort_keys=True, separators=(",", ":"))
        args = [
            payload,
            max_events,
            event["stream_id"],
            repr(float(event["end_s"])),
            repr(float(event["fired_unix_s"])),
            "1" if sets_cooldown else "0",
        ]
        event_id, trimmed = self._append(keys=keys, args=args)
        return None if event_id == 0 else (int(event_id), int(trimmed))

    def events_after(self, watch_id: str, after_id: int, limit: int) -> list[tuple[int, dict]]:
        members = self._client.zrangebyscore(self._key(watch_id, "events"), f"({after_id}", "+inf", start=0, num=limit)
        out = []
        for member in members:
            event_id, _, payload = member.partition("|")
            out.append((int(event_id), json.loads(payload)))
        return out

    def forget_stream(self, stream_id: str) -> None:
        pipe = self._client.pipeline(transaction=False)
        for watch_id in self._client.smembers(f"{self._ns}:watches"):
            pipe.hdel(self._key(watch_id, "state"), f"fired:{stream_id}")
        pipe.execute()

    def last_event_id(self) -> int:
        return int(self._client.get(f"{self._ns}:watch_seq") or 0)

    def claim_epoch(self, token: str) -> str:
        return self._claim_epoch(keys=[f"{self._ns}:watch_epoch"], args=[token])

    def restore(self, records: list[WatchRecord], last_event_id: int) -> list[str]:
        restored = [r.watch_id for r in records if self.put_watch(r)]
        if restored and last_event_id:
            pipe = self._client.pipeline(transaction=False)
            for watch_id in restored:
                pipe.hset(self._key(watch_id, "state"), "trimmed_through", last_event_id)
            pipe.execute()
        self._raise_seq(keys=[f"{self._ns}:watch_seq"], args=[last_event_id])
        return restored

    def close(self) -> None:
        self._client.close()
