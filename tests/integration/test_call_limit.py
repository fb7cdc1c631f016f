"""The router holds at most ``max_open_calls`` calls open at once: health Watch streams (which need no API key)
past the limit are refused with a sentence and counted, the health check always answers, and a place comes back
when its call ends. One client, a host or an API key, holds at most ``max_open_calls_per_client`` of them and
``max_push_calls_per_client`` PushFrames calls, while other clients' calls still get through. Real aio servers and
channels, the interceptors as the router installs them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile

import grpc
from bare_router import bare_servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.call_limit import CallLimitInterceptor
from services.client import retry_after_s
from services.config import ServiceConfig
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metrics import MosaicMetrics
from services.router import interceptors

KEY_A, KEY_B = "key-of-client-a", "key-of-client-b"


@contextlib.asynccontextmanager
async def _limited_server(cfg: ServiceConfig, metrics: MosaicMetrics, servicer=None):
    """The router's interceptors for ``cfg`` over health (and ``servicer``), with two channels: one over loopback TCP
    and one over a Unix socket, which the limits take for two hosts (``127.0.0.1`` and ``unix:``); and the limits."""
    chain = interceptors(cfg, metrics)
    server = grpc.aio.server(interceptors=chain)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if servicer is not None:
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    socket_dir = tempfile.mkdtemp(prefix="mosaic-limit-")  # short: a socket's path is at most 107 bytes
    server.add_insecure_port(f"unix:{socket_dir}/grpc.sock")
    await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as tcp,
            grpc.aio.insecure_channel(f"unix:{socket_dir}/grpc.sock") as unix,
        ):
            yield tcp, unix, next(i for i in chain if isinstance(i, CallLimitInterceptor))
    finally:
        await server.stop(None)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _limits(max_open_calls: int, **settings) -> ServiceConfig:
    """A config with ``max_open_calls`` and ``settings``; its per-client limits unset unless those set them."""
    return ServiceConfig(max_open_calls=max_open_calls, **settings)


async def _watch(stub, metadata=None):
    """A health Watch that has had its first answer (so the server runs it), and that answer's status."""
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""), metadata=metadata)
    first = await asyncio.wait_for(call.read(), 10)
    return call, first.status


async def _refused_watch(stub, metadata=None) -> grpc.aio.AioRpcError:
    try:
        call, _ = await _watch(stub, metadata)
    except grpc.aio.AioRpcError as err:
        return err
    call.cancel()
    raise AssertionError("a Watch was let through past its limit")


async def _held_push(stub, key: str, limits: CallLimitInterceptor) -> grpc.aio.StreamUnaryCall:
    """A PushFrames call with ``key`` that sends no frame, once ``limits`` counts it (or it ended): it holds its
    places."""
    calls_before = limits.open_calls
    call = stub.PushFrames(metadata=((("x-api-key", key),)), timeout=30)
    for _ in range(200):
        if limits.open_calls > calls_before or call.done():
            return call
        await asyncio.sleep(0.01)
    raise AssertionError("the PushFrames call never started")


async def _refused_push(stub, key: str) -> grpc.aio.AioRpcError:
    call = stub.PushFrames(metadata=((("x-api-key", key),)), timeout=10)
    await call.done_writing()
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("a PushFrames call was let through past its limit")


def _refusals(metrics: MosaicMetrics) -> float:
    return metrics.registry.get_sample_value("mosaic_errors_total", {"code": "RESOURCE_EXHAUSTED"}) or 0.0


def test_watches_past_the_limit_are_refused_and_a_place_comes_back_when_one_ends():
    metrics = MosaicMetrics()

    async def run():
        async with _limited_server(_limits(2), metrics) as (channel, _, _):
            stub = health_pb2_grpc.HealthStub(channel)
            (first, status), (second, _) = await _watch(stub), await _watch(stub)
            assert status == health_pb2.HealthCheckResponse.SERVING
            refused = await _refused_watch(stub)
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


def test_one_host_past_its_cap_is_refused_while_another_host_gets_through():
    """Without API keys a client is its host: the TCP client at its 2 is refused (and its health check answers),
    while the Unix socket's client, with the server far from its 8, opens a Watch."""
    metrics = MosaicMetrics()

    async def run():
        async with _limited_server(_limits(8, max_open_calls_per_client=2), metrics) as (tcp, unix, _):
            greedy, other = health_pb2_grpc.HealthStub(tcp), health_pb2_grpc.HealthStub(unix)
            held = [(await _watch(greedy))[0] for _ in range(2)]
            refused = await _refused_watch(greedy)
            check = await greedy.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            other_call, other_status = await _watch(other)
            for call in (*held, other_call):
                call.cancel()
            return refused, check.status, other_status

    refused, checked, other_status = asyncio.run(run())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "this client (calls from 127.0.0.1) has 2 calls open, its limit (max_open_calls_per_client)"
        in refused.details()
    )
    assert checked == other_status == health_pb2.HealthCheckResponse.SERVING
    assert _refusals(metrics) == 1


def test_one_api_key_past_its_caps_is_refused_while_another_key_gets_through(tmp_path):
    """With keys checked a client is its key, whichever host it calls from: key A, at its 2 calls, is refused over
    either channel while key B pushes; at its 1 PushFrames call of a cap of 1, the same."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    servicer = bare_servicer(push_idle_timeout_s=30)  # max_push_calls=4

    async def run(max_open_calls_per_client: int, max_push_calls_per_client: int):
        cfg = _limits(
            8,
            api_key_file=str(keys),
            max_open_calls_per_client=max_open_calls_per_client,
            max_push_calls_per_client=max_push_calls_per_client,
        )
        async with _limited_server(cfg, servicer.metrics, servicer) as (tcp, unix, limits):
            stub_a, other_host_a = mosaic_pb2_grpc.MosaicStub(tcp), mosaic_pb2_grpc.MosaicStub(unix)
            held = [await _held_push(stub_a, KEY_A, limits) for _ in range(max_push_calls_per_client)]
            refusals = [await _refused_push(stub, KEY_A) for stub in (stub_a, other_host_a)]
            held.append(await _held_push(stub_a, KEY_B, limits))
            b_held = not held[-1].done()
            for call in held:
                call.cancel()
            return refusals, b_held

    (tcp_refusal, unix_refusal), b_held = asyncio.run(run(2, 2))
    assert tcp_refusal.code() == unix_refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    sentence = "this client (calls with this API key) has 2 calls open, its limit (max_open_calls_per_client)"
    assert sentence in tcp_refusal.details() and sentence in unix_refusal.details()
    assert KEY_A not in tcp_refusal.details()
    assert b_held, "key B's PushFrames call was refused while only key A was at its cap"

    (push_refusal, _), b_held = asyncio.run(run(8, 1))
    assert push_refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "this client (calls with this API key) has 1 PushFrames calls open, its limit (max_push_calls_per_client)"
        in push_refusal.details()
    )
    assert retry_after_s(push_refusal) == 1.0
    assert b_held


def test_unset_per_client_limits_leave_one_client_every_place_of_the_server():
    """With the per-client limits unset (the default), one client may hold every PushFrames place; the call past
    them is refused by the server's own limit, max_push_calls, with its retry hint, not by a client's."""
    servicer = bare_servicer(push_idle_timeout_s=30)  # max_push_calls=4

    async def run():
        async with _limited_server(ServiceConfig(max_push_calls=4), servicer.metrics, servicer) as (tcp, _, limits):
            stub = mosaic_pb2_grpc.MosaicStub(tcp)
            held = [await _held_push(stub, "", limits) for _ in range(4)]
            all_held = not any(call.done() for call in held)
            refused = await _refused_push(stub, "")
            for call in held:
                call.cancel()
            return all_held, refused

    all_held, refused = asyncio.run(run())
    assert all_held, "one client was refused a PushFrames place while the server had some"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PushFrames calls already, its limit" in refused.details() and "per_client" not in refused.details()
    assert retry_after_s(refused) == 1.0


def test_a_key_nobody_checks_names_no_client(tmp_path):
    """A health Watch needs no key, so one it carries is not checked: Watches from one host, each with a key of its
    own, are that host's and meet its cap."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\n")
    metrics = MosaicMetrics()

    async def run():
        cfg = _limits(8, api_key_file=str(keys), max_open_calls_per_client=2)
        async with _limited_server(cfg, metrics) as (tcp, _, _):
            stub = health_pb2_grpc.HealthStub(tcp)
            held = [(await _watch(stub, (("x-api-key", f"made-up-{n}"),)))[0] for n in range(2)]
            refused = await _refused_watch(stub, (("x-api-key", "made-up-2"),))
            for call in held:
                call.cancel()
            return refused

    refused = asyncio.run(run())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this client (calls from 127.0.0.1) has 2 calls open" in refused.details()


def test_a_call_without_a_valid_key_is_told_so_even_when_the_server_is_full(tmp_path):
    """The key is checked before the limits: a caller without a valid key takes no place and does not learn that
    the server is full."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\n")
    servicer = bare_servicer(push_idle_timeout_s=30)

    async def run():
        async with _limited_server(_limits(1, api_key_file=str(keys)), servicer.metrics, servicer) as (tcp, _, limits):
            stub = mosaic_pb2_grpc.MosaicStub(tcp)
            held = await _held_push(stub, KEY_A, limits)
            refusals = [await _refused_push(stub, key) for key in ("not-a-key", KEY_A)]
            held.cancel()
            return refusals

    wrong_key, busy = asyncio.run(run())
    assert wrong_key.code() == grpc.StatusCode.UNAUTHENTICATED
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(max_open_calls)" in busy.details()


def test_the_service_calls_pass_through_the_limit_unchanged():
    """Unary and response-streaming calls of mosaic.v1 behave as without the limiter: an answer, or their own
    status with its sentence."""
    servicer = bare_servicer()

    async def run():
        async with _limited_server(_limits(8), servicer.metrics, servicer) as (channel, _, _):
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
