"""The router holds at most ``max_open_calls`` calls open at once: health Watch streams (which need no API key)
past the limit are refused with a sentence and counted, the health check always answers, and a place comes back
when its call ends. Real aio servers and channels, the limiter as the router installs it."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from bare_router import bare_servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.call_limit import CallLimitInterceptor
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metrics import MosaicMetrics


@contextlib.asynccontextmanager
async def _limited_server(limit: int, metrics: MosaicMetrics, servicer=None):
    server = grpc.aio.server(interceptors=[CallLimitInterceptor(limit, metrics)])
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if servicer is not None:
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _watch(stub):
    """A health Watch that has had its first answer (so the server runs it), and that answer's status."""
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(call.read(), 10)
    return call, first.status


def _refusals(metrics: MosaicMetrics) -> float:
    return metrics.registry.get_sample_value("mosaic_errors_total", {"code": "RESOURCE_EXHAUSTED"}) or 0.0


def test_watches_past_the_limit_are_refused_and_a_place_comes_back_when_one_ends():
    metrics = MosaicMetrics()

    async def run():
        async with _limited_server(2, metrics) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            (first, status), (second, _) = await _watch(stub), await _watch(stub)
            assert status == health_pb2.HealthCheckResponse.SERVING
            try:
                await _watch(stub)
                raise AssertionError("a third Watch was let through past the limit of 2")
            except grpc.aio.AioRpcError as err:
                refused = err
            check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)  # probes always answer
            first.cancel()
            for _ in range(50):  # the server sees the cancel a moment later
                await asyncio.sleep(0.05)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    third, _ = await _watch(stub)
                    break
            else:
                raise AssertionError("no place came back after a Watch ended")
            second.cancel()
            third.cancel()
            return refused, check.status

    refused, checked = asyncio.run(run())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the server has 2 calls open, its limit (max_open_calls)" in refused.details()
    assert checked == health_pb2.HealthCheckResponse.SERVING
    assert _refusals(metrics) >= 1


def test_the_service_calls_pass_through_the_limit_unchanged():
    """Unary and response-streaming calls of mosaic.v1 behave as without the limiter: an answer, or their own
    status with its sentence."""
    servicer = bare_servicer()

    async def run():
        async with _limited_server(8, servicer.metrics, servicer) as channel:
            stub = mosaic_pb2_grpc.MosaicStub(channel)
            listed = await stub.ListStreams(pb.ListStreamsRequest(), timeout=10)
            try:
                async for _ in stub.WatchEvents(pb.WatchEventsRequest(watch_ids=["nope"]), timeout=10):
                    pass
            except grpc.aio.AioRpcError as err:
                return listed, err

    listed, err = asyncio.run(run())
    assert list(listed.streams) == []
    assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), err
    assert err.details() and "Traceback" not in err.details()
