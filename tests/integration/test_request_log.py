"""``--log-level DEBUG`` logs one line per gRPC request: a real aio server with the interceptor, real calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.request_log import RequestLogInterceptor


@contextlib.asynccontextmanager
async def _health_stub():
    """A health service behind the request log's interceptor, on a free loopback port, and a stub of it."""
    server = grpc.aio.server(interceptors=[RequestLogInterceptor()])
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield health_pb2_grpc.HealthStub(channel)
    finally:
        await server.stop(None)


async def _serve_and_call() -> None:
    async with _health_stub() as stub:
        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)


def test_each_request_is_one_debug_line_with_its_status(caplog):
    with caplog.at_level(logging.DEBUG, logger="mosaic.requests"):
        asyncio.run(_serve_and_call())
    lines = [r.getMessage() for r in caplog.records if r.name == "mosaic.requests"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("/grpc.health.v1.Health/Check from ") and " -> OK in " in lines[0]
    assert " -> NOT_FOUND in " in lines[1]


def test_nothing_is_logged_above_debug(caplog):
    with caplog.at_level(logging.INFO, logger="mosaic.requests"):
        asyncio.run(_serve_and_call())
    assert not [r for r in caplog.records if r.name == "mosaic.requests"]


def test_a_health_watch_is_answered_and_logged_at_debug(caplog):
    """grpc_health's Watch writes its answers itself (a coroutine, not a generator of them)."""

    async def watch_once():
        async with _health_stub() as stub:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(call.read(), 10)
            call.cancel()
            return first.status

    with caplog.at_level(logging.DEBUG, logger="mosaic.requests"):
        assert asyncio.run(watch_once()) == health_pb2.HealthCheckResponse.SERVING
