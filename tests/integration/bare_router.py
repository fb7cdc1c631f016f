"""The router's servicer with no workers, served by a real gRPC server on loopback: for the calls a router answers
before it asks a worker (bad input, watches, pushed frames it cannot route)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from services.coordinator import Coordinator
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metrics import MosaicMetrics
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer


def bare_servicer(metrics: MosaicMetrics | None = None, **options) -> MosaicServicer:
    """A servicer whose coordinator has started with no workers; ``options`` go to ``MosaicServicer``."""
    metrics = metrics or MosaicMetrics()
    coordinator = Coordinator([], None, metrics)
    coordinator.started = True
    return MosaicServicer(
        coordinator, QueryQueue(max_waiting=4, max_running=1), metrics,
        mode="cluster", default_max_new_tokens=8, max_push_calls=4, **options,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def served(servicer: MosaicServicer, options: list | None = None) -> AsyncIterator[mosaic_pb2_grpc.MosaicStub]:
    """A stub of ``servicer`` served on a free loopback port, server and channel with gRPC's ``options``; the server
    stops after the block."""
    server = grpc.aio.server(options=options)
    mosaic_pb2_grpc.add_MosaicServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield mosaic_pb2_grpc.MosaicStub(channel)
    finally:
        await server.stop(0)
