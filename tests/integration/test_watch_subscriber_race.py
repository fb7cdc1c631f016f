"""A WatchEvents subscriber following several watches gets every event, even one stored in a watch it has already
read while it reads the next (in-memory and Redis stores)."""

from __future__ import annotations

import asyncio

import pytest

from services.config import load_config
from services.coordinator import Coordinator
from services.metadata.watches import InMemoryWatchStore, RedisWatchStore
from services.metrics import MosaicMetrics
from services.watches import WatchRegistry
from services.watches_spec import WatchRecord


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return InMemoryWatchStore()
    client = request.getfixturevalue("redis_client")
    return RedisWatchStore(client, namespace=request.getfixturevalue("redis_namespace"))


def _registry(store) -> WatchRegistry:
    metrics = MosaicMetrics()
    coordinator = Coordinator([], None, metrics)
    coordinator.started = True
    coordinator.placement = {"cam": 0}
    return WatchRegistry(store, coordinator, metrics, load_config(None))


def _event(end_s: float) -> dict:
    return {"stream_id": "cam", "end_s": end_s, "fired_unix_s": 0.0}


def test_an_event_stored_in_a_watch_already_read_is_not_passed_by_the_cursor(store):
    async def run():
        registry = _registry(store)
        for watch_id in ("w-a", "w-b"):
            await registry.create(WatchRecord(watch_id=watch_id, question="Truck?", stream_ids=["cam"]))
        loop = asyncio.get_running_loop()
        read_events = store.events_after

        def events_after(watch_id, after_id, limit):
            """Right after the subscriber's first read of w-a, one event lands in each watch: w-a's gets the smaller
            id, after w-a was read and before w-b is (the router stores an event, then wakes the subscribers)."""
            events = read_events(watch_id, after_id, limit)
            if watch_id == "w-a" and not fired:
                fired.append(True)
                store.append_event("w-a", _event(1.0), max_events=100)
                store.append_event("w-b", _event(2.0), max_events=100)
                asyncio.run_coroutine_threadsafe(registry._wake_subscribers(), loop)
            return events

        fired: list[bool] = []
        store.events_after = events_after
        got = []
        events = registry.subscribe(["w-a", "w-b"], 0)
        try:
            async with asyncio.timeout(3.0):
                async for item in events:
                    got.append((item.event_id, item.payload["end_s"]))
                    if len(got) == 2:
                        break
        except TimeoutError:
            pass
        finally:
            await events.aclose()
        assert fired, "the subscriber never read w-a"
        assert got == [(1, 1.0), (2, 2.0)]

    asyncio.run(run())
