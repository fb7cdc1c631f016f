"""A Redis that restarts without its data must not read as every watch deleted, and events a frozen one could not
store are counted lost (real redis-server, no Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis

from services.config import load_config
from services.coordinator import Coordinator
from services.metadata.watches import RedisWatchStore
from services.metrics import MosaicMetrics
from services.watches import WatchRegistry
from services.watches_spec import FiredEvent, WatchRecord, WatchReport


def _registry(store: RedisWatchStore) -> WatchRegistry:
    metrics = MosaicMetrics()
    coordinator = Coordinator([], None, metrics)
    coordinator.started = True
    coordinator.placement = {"cam": 0}
    return WatchRegistry(store, coordinator, metrics, load_config(None))


def _fired(watch_id: str, end_s: float) -> FiredEvent:
    now = time.time()
    return FiredEvent(watch_id=watch_id, stream_id="cam", cluster_id=f"cam/c{int(end_s):06d}", start_s=end_s - 1,
                      end_s=end_s, score=2.0, answer="a van", answer_error="", sealed_unix_s=now - 0.5,
                      fired_unix_s=now)  # fmt: skip


def _lose_data(client, namespace: str) -> None:
    """What a Redis restarted without persistence holds of this deployment: nothing."""
    client.delete(*client.scan_iter(match=f"{namespace}:*", count=1000))


async def _events(registry: WatchRegistry, after: int) -> list:
    """The events after ``after`` that come within half a second."""
    got = []
    events = registry.subscribe(["gate"], after)
    try:
        async with asyncio.timeout(0.5):
            async for item in events:
                got.append(item)
    except TimeoutError:
        pass
    finally:
        await events.aclose()
    return got


@contextlib.asynccontextmanager
async def _watching_the_gate(store: RedisWatchStore) -> AsyncIterator[WatchRegistry]:
    """A started registry with the watch "gate" and one event of it (id 1)."""
    registry = _registry(store)
    await registry.start()
    try:
        await registry.create(WatchRecord(watch_id="gate", question="Is a van at the gate?", stream_ids=["cam"]))
        await registry._record(_fired("gate", 1.0))
        yield registry
    finally:
        await registry.stop_polls()
        await registry.close()


def test_watches_are_written_back_and_ids_go_on_after_the_store_lost_its_data(redis_client, redis_namespace, caplog):
    async def run():
        store = RedisWatchStore(redis_client, namespace=redis_namespace)
        async with _watching_the_gate(store) as registry:
            await registry._record(_fired("gate", 2.0))
            _lose_data(redis_client, redis_namespace)
            with caplog.at_level(logging.ERROR, logger="services.watches"):
                await registry._reload()
            assert [w.watch_id for w in store.list_watches()] == ["gate"]
            assert list(registry._records) == ["gate"]
            assert "lost its data" in caplog.text and "gate" in caplog.text
            await registry._record(_fired("gate", 3.0))
            resumed = await _events(registry, 2)
            assert [(i.event_id, i.payload["end_s"], i.missed_before) for i in resumed] == [(3, 3.0, False)]
            from_start = await _events(registry, 0)  # events 1 and 2 went with the data: the reader is told
            assert [(i.event_id, i.missed_before) for i in from_start] == [(3, True)]

    asyncio.run(run())


def test_an_event_fired_before_the_loss_is_noticed_is_stored_not_dropped(redis_client, redis_namespace):
    async def run():
        store = RedisWatchStore(redis_client, namespace=redis_namespace)
        async with _watching_the_gate(store) as registry:
            _lose_data(redis_client, redis_namespace)
            await registry._record(_fired("gate", 2.0))
            assert [(i, e["end_s"]) for i, e in store.events_after("gate", 0, 10)] == [(2, 2.0)]
            assert store.last_event_id() == 2

    asyncio.run(run())


def _dropped(registry: WatchRegistry, reason: str) -> float:
    [family] = registry.metrics.events_dropped_total.collect()
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["reason"] == reason)


def test_events_the_store_cannot_take_are_counted_lost_and_later_ones_stored(redis_server, frozen_redis,
                                                                           redis_namespace):  # fmt: skip
    """A worker hands its events over as the router takes them: those a frozen Redis does not confirm are not sent
    on (a write it had received may still land as it wakes), and mosaic_watch_events_dropped_total must say so (the
    alert MosaicWatchEventsLost reads it); the report's later events are still tried, and the store takes events
    again once Redis wakes."""

    async def run():
        client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True,
                             socket_timeout=0.5)  # fmt: skip
        store = RedisWatchStore(client, namespace=redis_namespace)
        async with _watching_the_gate(store) as registry:
            with frozen_redis():
                await registry._absorb(WatchReport(events=[_fired("gate", 2.0), _fired("gate", 3.0)]))
            assert _dropped(registry, "store_failed") == 2
            await registry._absorb(WatchReport(events=[_fired("gate", 4.0)]))
            assert store.events_after("gate", 0, 10)[-1][1]["end_s"] == 4.0

    asyncio.run(run())
