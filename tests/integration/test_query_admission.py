"""What the router refuses of a question before it takes a queue slot, on a real gRPC server: a question the
workers would refuse anyway must not wait for, or be refused for, room it would never use."""

from __future__ import annotations

import asyncio

import grpc
from bare_router import bare_servicer, served

from services.gen.mosaic.v1 import mosaic_pb2 as pb

STREAM = "cam-1"


def test_too_many_new_tokens_are_refused_before_the_queue_whatever_its_room():
    """With the queue full (one running, four waiting), a question asking more than the workers' limit is refused
    INVALID_ARGUMENT with the engine's sentence, not RESOURCE_EXHAUSTED; one at the limit is refused for the full
    queue, as it would have waited for a worker."""

    async def run():
        servicer = bare_servicer(max_new_tokens_limit=64)
        servicer.coordinator.workers = [object()]  # never called: the question is refused before any worker is
        servicer.coordinator.placement = {STREAM: 0}
        tickets = [servicer.queue.admit("other", pb.PRIORITY_NORMAL) for _ in range(5)]  # 1 running, 4 waiting
        codes = {}
        try:
            async with served(servicer) as stub:
                for asked in (65, 64):
                    request = pb.QueryRequest(stream_ids=[STREAM], question="what moved?", max_new_tokens=asked)
                    try:
                        await anext(aiter(stub.Query(request, timeout=10)))
                    except grpc.aio.AioRpcError as err:
                        codes[asked] = (err.code(), err.details())
        finally:
            for ticket in tickets:
                servicer.queue.release(ticket)
        return codes

    codes = asyncio.run(run())
    assert codes[65] == (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be in 1..64, got 65.")
    assert codes[64][0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_router_takes_the_workers_limit_from_the_engine_settings():
    """The router's servicer checks against the workers' ``EngineConfig.max_new_tokens_limit`` (the ``engine:``
    settings), so the two checks cannot drift apart."""
    from services.config import load_config
    from services.router import MosaicServer
    from services.scheduler import QueryQueue

    config = load_config(None, engine={"max_new_tokens_limit": 48}, grpc_port=0, host="127.0.0.1")

    async def run() -> int:
        server = MosaicServer(config)
        await server._start_grpc(QueryQueue(max_waiting=1, max_running=1))
        try:
            return server.servicer.max_new_tokens_limit
        finally:
            await server._server.stop(0)
            server.servicer.close()

    assert config.engine_config().max_new_tokens_limit == 48
    assert asyncio.run(run()) == 48
