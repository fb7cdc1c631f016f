"""A client that goes without closing its connection (its node lost, a NAT that forgot it) is found by the router's
keepalive pings, and its calls end: its WatchEvents subscriber place is free again for other clients."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from bare_router import bare_servicer

from services.config import load_config
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metadata.watches import InMemoryWatchStore
from services.router import grpc_server_options
from services.watches import WatchRegistry


class FreezableProxy:
    """A TCP relay to ``port``; ``freeze`` stops relaying either way and keeps both connections open, as a peer that
    vanished does."""

    def __init__(self, port: int) -> None:
        self.port, self.frozen, self._tasks = port, asyncio.Event(), set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)

    async def _pump(self, reader, writer) -> None:
        while not self.frozen.is_set():
            data = await reader.read(65536)
            if not data or self.frozen.is_set():
                break
            writer.write(data)
            await writer.drain()
        await asyncio.Event().wait()  # never closes its side

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._server.close()


def test_a_vanished_watch_subscriber_frees_its_place():
    config = load_config(None, max_watch_subscribers=1, grpc_keepalive_s=0.5, grpc_keepalive_timeout_s=0.5)

    async def run():
        servicer = bare_servicer()
        servicer.watches = WatchRegistry(InMemoryWatchStore(), servicer.coordinator, servicer.metrics, config)
        server = grpc.aio.server(options=grpc_server_options(config))
        mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        proxy = FreezableProxy(port)
        proxy_port = await proxy.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as far:
                gone = mosaic_pb2_grpc.MosaicStub(far).WatchEvents(pb.WatchEventsRequest())
                await asyncio.sleep(0.5)  # subscribed: the one place is taken
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as near:
                    stub = mosaic_pb2_grpc.MosaicStub(near)
                    refused = await _first_code(stub.WatchEvents(pb.WatchEventsRequest()), 2.0)
                    proxy.frozen.set()
                    await asyncio.sleep(3.0)  # a few keepalive periods
                    later = await _first_code(stub.WatchEvents(pb.WatchEventsRequest()), 2.0)
                gone.cancel()
        finally:
            await proxy.close()
            await servicer.watches.stop_polls()
            await servicer.watches.end_subscribers()
            await server.stop(0)
        return refused, later

    refused, later = asyncio.run(run())
    assert refused == "RESOURCE_EXHAUSTED"
    assert later == "open", later  # the vanished client's place was given back


async def _first_code(call, wait_s: float) -> str:
    """The call's status code if it ends within ``wait_s``, else ``open`` (it was admitted and waits for events)."""
    try:
        async with asyncio.timeout(wait_s):
            async for _ in call:
                pass
    except TimeoutError:
        return "open"
    except grpc.aio.AioRpcError as err:
        return err.code().name
    finally:
        with contextlib.suppress(Exception):
            call.cancel()
    return "OK"
