"""API keys on a real gRPC server: every call of ``mosaic.v1.Mosaic``, streaming ones included, is refused without a
key with UNAUTHENTICATED and a sentence, health stays open, and a key file's keys rotate without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
import pytest
from bare_router import bare_servicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services import api_keys
from services.api_keys import ApiKeys
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metrics import MosaicMetrics
from services.router import ApiKeyInterceptor

METHODS = pb.DESCRIPTOR.services_by_name["Mosaic"].methods
MESSAGES = {m.full_name: getattr(pb, m.name) for m in pb.DESCRIPTOR.message_types_by_name.values()}


@contextlib.asynccontextmanager
async def keyed_server(keys: ApiKeys, metrics: MosaicMetrics):
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys, metrics)])
    mosaic_pb2_grpc.add_MosaicServicer_to_server(bare_servicer(metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def _call(channel: grpc.aio.Channel, method, key: str | None) -> tuple[grpc.StatusCode, str]:
    """Calls ``method`` with an empty request (a stream of one) and ``key``; its code and sentence once it ends."""
    request_type = MESSAGES[method.input_type.full_name]
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}  # fmt: skip
    make = kind[(method.client_streaming, method.server_streaming)]
    stub = make(f"/mosaic.v1.Mosaic/{method.name}", request_serializer=request_type.SerializeToString)
    request = iter([request_type()]) if method.client_streaming else request_type()
    call = stub(request, metadata=(("x-api-key", key),) if key is not None else None, timeout=10)
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_every_call_without_the_key_is_unauthenticated_with_a_sentence(method):
    async def run():
        metrics = MosaicMetrics()
        async with keyed_server(ApiKeys(key="right-key"), metrics) as channel:
            results = [await _call(channel, method, key) for key in (None, "wrong-key")]
            right_code, _ = await _call(channel, method, "right-key")
            probe = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return results, right_code, probe

    (missing, wrong), right_code, probe = asyncio.run(run())
    assert missing == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the x-api-key metadata header is missing; send the server's API key.",
    )
    assert wrong == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the x-api-key metadata header is wrong; send the server's API key.",
    )
    assert right_code != grpc.StatusCode.UNAUTHENTICATED  # the servicer's own answer, whatever an empty request gets
    assert probe.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key


def _write(path, text: str) -> None:
    """Replaces the file as the kubelet updates a Secret volume: a new file swapped in under the same name."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_key_file_rotates_without_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(api_keys, "RECHECK_S", 0.05)
    key_file = tmp_path / "keys"
    key_file.write_text("old-key\n")

    async def codes(channel, *keys):
        method = pb.DESCRIPTOR.services_by_name["Mosaic"].methods_by_name["ListStreams"]
        return [(await _call(channel, method, key))[0].name for key in keys]

    async def run():
        async with keyed_server(ApiKeys(path=str(key_file)), MosaicMetrics()) as channel:
            seen = [await codes(channel, "old-key", "new-key")]
            for text in ("old-key\nnew-key\n", "new-key\n", "", "new-key\nbad key\x07\n"):
                _write(key_file, text)
                await asyncio.sleep(0.1)
                seen.append(await codes(channel, "old-key", "new-key"))
            key_file.unlink()
            await asyncio.sleep(0.1)
            seen.append(await codes(channel, "old-key", "new-key"))
        return seen

    assert asyncio.run(run()) == [
        ["OK", "UNAUTHENTICATED"],  # the file as the server started with it
        ["OK", "OK"],  # both during the rotation
        ["UNAUTHENTICATED", "OK"],  # the old key removed: refused from the next check of the file on
        ["UNAUTHENTICATED", "OK"],  # an empty file would refuse everyone: the keys read before stay
        ["UNAUTHENTICATED", "OK"],  # so does a file with a key no client can send
        ["UNAUTHENTICATED", "OK"],  # and a file that is gone
    ]
