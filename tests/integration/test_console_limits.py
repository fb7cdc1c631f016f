"""The console's event streams against the real servicer and API-key check (no workers, no Ray): question and
watch-event streams have limits of their own, a wrong key is 401 before any limit, and an idle stream sends
comments, so a peer that went away is found."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

import grpc
import pytest

from services.api_keys import ApiKeys
from services.auth import ApiKeyInterceptor
from services.config import load_config
from services.console import server as console_server
from services.console.server import ConsoleServer
from services.coordinator import Coordinator
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metadata.watches import InMemoryWatchStore
from services.metrics import MosaicMetrics
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer
from services.watches import WatchRegistry

KEY = "console-key"
WATCH_LIMIT = 2


@pytest.fixture
def console_port(monkeypatch):
    monkeypatch.setitem(console_server.MAX_OPEN_STREAMS, "watch", WATCH_LIMIT)
    monkeypatch.setattr(console_server, "HEARTBEAT_S", 0.2)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = load_config(None, host="127.0.0.1", console=True, console_port=0, api_key=KEY)

    async def start():
        metrics = MosaicMetrics()
        coordinator = Coordinator([], None, metrics)
        coordinator.started = True
        servicer = MosaicServicer(
            coordinator, QueryQueue(max_waiting=4, max_running=1), metrics, mode="cluster",
            default_max_new_tokens=8, max_push_calls=4,
        )  # fmt: skip
        servicer.watches = WatchRegistry(InMemoryWatchStore(), coordinator, metrics, config)
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(ApiKeys(key=KEY), metrics)])
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
        console = ConsoleServer(config)
        console.bind_grpc(server)
        await server.start()
        await console.start()
        return server, console, servicer.watches

    server, console, watches = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield console.port

    async def stop():
        await watches.end_subscribers()
        await console.stop()
        await server.stop(0)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _open(port: int, method: str, path: str, *, key: str = KEY, body: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    return connection, connection.getresponse()


def test_watch_streams_have_their_own_limit_checked_after_the_key_and_idle_ones_send_comments(console_port):
    followers = [_open(console_port, "GET", "/api/watch-events") for _ in range(WATCH_LIMIT)]
    try:
        assert [response.status for _, response in followers] == [200] * WATCH_LIMIT
        connection, refused = _open(console_port, "GET", "/api/watch-events")
        assert refused.status == 429 and b"2 watch event streams open" in refused.read()
        connection.close()
        connection, wrong_key = _open(console_port, "GET", "/api/watch-events", key="wrong")
        assert wrong_key.status == 401  # the key first: a stranger learns nothing of the console's load
        connection.close()
        connection, asked = _open(console_port, "POST", "/api/query", body={"question": "Where is the van?"})
        assert asked.status != 429, asked.read()  # the questions' room is their own
        connection.close()
        _, response = followers[0]
        assert response.read(len(b": open\n\n")) == b": open\n\n"
        assert response.read(len(b": ping\n\n")) == b": ping\n\n"  # nothing happened: a comment came anyway
    finally:
        for connection, _ in followers:
            connection.close()
