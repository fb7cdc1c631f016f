"""A Redis that stops answering (frozen by SIGSTOP: the kernel still accepts its connections, nothing replies) costs a
call the client's timeout, not its thread for the outage: a gRPC call fails with UNAVAILABLE and a sentence, a
worker's metadata publisher marks the store down, and both work again once Redis wakes. Real redis-server, real gRPC
server with the router's servicer and watch registry, no Ray."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import grpc
import pytest
import redis
from bare_router import bare_servicer, served

import services.watches
from services.config import load_config
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metadata import StreamRecord
from services.metadata.redis_store import RedisMetadataStore
from services.metadata.watches import RedisWatchStore
from services.publisher import MetadataPublisher, PutStream, WorkerView
from services.store_actor import connect_store
from services.watches import WatchRegistry
from services.watches_spec import FiredEvent, WatchRecord

TIMEOUT_S = 0.5  # the stores' redis_timeout_s here
BOUND_S = 4 * TIMEOUT_S  # a call may pay one connect and one reply timeout, plus scheduling on a busy machine
CALL_DEADLINE_S = 8.0  # the client's: far past the bound, so a call that hangs is told from one that fails fast


@contextlib.asynccontextmanager
async def _router(redis_server, namespace: str):
    """A gRPC server with the router's servicer and a watch registry on a store made as the router makes it, holding
    the watch "gate"."""
    config = load_config(None, redis_timeout_s=TIMEOUT_S)
    store = RedisWatchStore.from_url(redis_server.url, namespace=namespace, timeout_s=config.redis_timeout_s)
    store.put_watch(WatchRecord(watch_id="gate", question="Is a van at the gate?", stream_ids=[]))
    servicer = bare_servicer()
    servicer.watches = WatchRegistry(store, servicer.coordinator, servicer.metrics, config)
    servicer.watches._records = {r.watch_id: r for r in store.list_watches()}
    try:
        async with served(servicer) as stub:
            yield stub, servicer.watches
    finally:
        store.close()


async def _failure(call) -> tuple[grpc.aio.AioRpcError, float]:
    started_s = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value, time.monotonic() - started_s


async def _first_event(stub) -> None:
    async for _ in stub.WatchEvents(pb.WatchEventsRequest(watch_ids=["gate"]), timeout=CALL_DEADLINE_S):
        return


CALLS = {
    "ListWatches": lambda stub: stub.ListWatches(pb.ListWatchesRequest(), timeout=CALL_DEADLINE_S),
    "DeleteWatch": lambda stub: stub.DeleteWatch(pb.DeleteWatchRequest(watch_id="gate"), timeout=CALL_DEADLINE_S),
    "WatchEvents": _first_event,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_call_against_a_frozen_redis_is_unavailable_within_the_timeout_and_works_once_it_wakes(
    name, redis_server, frozen_redis, redis_namespace
):
    async def run():
        async with _router(redis_server, redis_namespace) as (stub, _):
            with frozen_redis():
                err, elapsed_s = await _failure(CALLS[name](stub))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{err.code().name} after {elapsed_s:.1f}s"
            assert err.details() == "The metadata store (Redis) did not answer in time; retry shortly."
            assert elapsed_s < BOUND_S
            answer = await stub.ListWatches(pb.ListWatchesRequest(), timeout=CALL_DEADLINE_S)
            if name != "DeleteWatch":  # a delete the frozen Redis had received may land as it wakes
                assert [w.watch_id for w in answer.watches] == ["gate"]

    asyncio.run(run())


def test_a_subscriber_waiting_longer_than_the_timeout_still_gets_the_next_event(redis_server, redis_namespace):
    """A subscriber waits for events between short reads, none of which waits on the server: its idle connection
    outliving the reply timeout breaks nothing."""

    async def run():
        async with _router(redis_server, redis_namespace) as (stub, registry):
            request = pb.WatchEventsRequest(watch_ids=["gate"], after_event_id=0)
            call = stub.WatchEvents(request, timeout=CALL_DEADLINE_S)
            await asyncio.sleep(3 * TIMEOUT_S)
            now_s = time.time()
            await registry._record(FiredEvent(watch_id="gate", stream_id="cam", cluster_id="cam/c000001", start_s=0.0,
                                              end_s=1.0, score=2.0, answer="a van", answer_error="",
                                              sealed_unix_s=now_s, fired_unix_s=now_s))  # fmt: skip
            item = await asyncio.wait_for(call.read(), BOUND_S)
            assert item.event_id == 1
            call.cancel()

    asyncio.run(run())


def test_the_watch_reload_fails_fast_on_a_frozen_redis_and_reloads_once_it_wakes(
    redis_server, frozen_redis, redis_namespace
):
    async def run():
        async with _router(redis_server, redis_namespace) as (_, registry):
            with frozen_redis():
                started_s = time.monotonic()
                with pytest.raises(redis.TimeoutError):
                    await asyncio.wait_for(registry._reload(), CALL_DEADLINE_S)
                elapsed_s = time.monotonic() - started_s
            assert elapsed_s < BOUND_S
            registry.store.put_watch(WatchRecord(watch_id="door", question="Is the door open?", stream_ids=[]))
            await registry._reload()
            assert sorted(registry._records) == ["door", "gate"]

    asyncio.run(run())


def test_the_reload_loop_logs_a_frozen_redis_once_and_says_when_it_answers_again(
    redis_server, frozen_redis, redis_namespace, monkeypatch, caplog
):
    monkeypatch.setattr(services.watches, "RELOAD_INTERVAL_S", 0.1)

    async def run():
        async with _router(redis_server, redis_namespace) as (_, registry):
            loop = asyncio.create_task(registry._reload_loop())
            try:
                with caplog.at_level(logging.DEBUG, logger="services.watches"), frozen_redis():
                    await asyncio.sleep(4 * TIMEOUT_S)
                with caplog.at_level(logging.WARNING, logger="services.watches"):
                    deadline_s = time.monotonic() + BOUND_S
                    while "works again" not in caplog.text and time.monotonic() < deadline_s:
                        await asyncio.sleep(0.05)
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        failed = [r for r in caplog.records if "reloading watches from the store failed" in r.getMessage()]
        assert [r.levelno for r in failed][:2] == [logging.WARNING, logging.DEBUG], caplog.text
        assert {r.levelno for r in failed[1:]} == {logging.DEBUG}
        assert "cannot be reached (TimeoutError: " in failed[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info], "an outage logged as a bug, with its traceback"
        assert "works again" in caplog.text

    asyncio.run(run())


def test_a_workers_publisher_marks_a_frozen_store_down_and_publishes_once_it_wakes(
    redis_server, frozen_redis, redis_namespace
):
    """The worker's publisher thread writes to a store made as the worker makes it: frozen, each write fails after the
    timeout (mosaic_metadata_store_up goes to 0), and the worker's view is published once Redis answers again."""
    config = load_config(None, redis_timeout_s=TIMEOUT_S)
    store = connect_store(redis_server.url, namespace=redis_namespace, timeout_s=config.redis_timeout_s)
    streams = {"cam": StreamRecord(stream_id="cam", fps=1.0, worker_id="0")}
    publisher = MetadataPublisher(store, "0", lambda: WorkerView(dict(streams), {}), resync_interval_s=3600).start()
    try:
        assert publisher.wait_idle(10)
        with frozen_redis():
            streams["door"] = StreamRecord(stream_id="door", fps=1.0, worker_id="0")
            publisher.enqueue(PutStream(streams["door"]))
            deadline_s = time.monotonic() + BOUND_S
            while publisher.snapshot_stats().store_up and time.monotonic() < deadline_s:
                time.sleep(0.05)
            stats = publisher.snapshot_stats()
        assert not stats.store_up and stats.write_errors >= 1 and "TimeoutError" in stats.last_error
        assert publisher.wait_idle(10)
        assert publisher.snapshot_stats().store_up
        assert store.streams_on_worker("0") == ["cam", "door"]
    finally:
        publisher.stop()
        store.close()


def test_a_frozen_redis_frees_the_calling_thread_within_the_timeout(redis_server, frozen_redis, redis_namespace):
    """Each store call returns its thread (here a plain thread, in the router one of asyncio's default executor)."""
    store = RedisMetadataStore.from_url(redis_server.url, namespace=redis_namespace, timeout_s=TIMEOUT_S)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            store.get_stream("cam")
        except Exception as err:
            errors.append(err)

    try:
        with frozen_redis():
            threads = [threading.Thread(target=read, daemon=True) for _ in range(4)]
            for thread in threads:
                thread.start()
            deadline_s = time.monotonic() + BOUND_S
            for thread in threads:
                thread.join(max(0.0, deadline_s - time.monotonic()))
            alive = sum(t.is_alive() for t in threads)
        assert alive == 0 and len(errors) == 4 and all(isinstance(e, redis.TimeoutError) for e in errors)
        assert store.get_stream("cam") is None
    finally:
        store.close()
