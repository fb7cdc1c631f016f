"""Watches whose listing would pass the server's message limit: ListWatches answers in one message, so one client's
watches with long labels and questions (within each limit) must not grow it past what gRPC sends. Past it, gRPC
failed every ListWatches (and the console's watch page) with RESOURCE_EXHAUSTED and no sentence, until watches were
deleted. CreateWatch refuses the watch that would not fit instead, saying why.

The router's real servicer and watch registry on the in-memory store, with no worker, over a real gRPC channel with
the router's message limit.
"""

from __future__ import annotations

import asyncio

import grpc
from bare_router import bare_servicer, served

from services.config import load_config
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metadata.watches import InMemoryWatchStore
from services.watches import WatchRegistry

LIMIT_BYTES = 200 * 1024
# 32 labels of the longest names and values, in 4-byte characters: about 40 KiB a watch, each within the limits
LABELS = {"\U0001f600" * 62 + chr(0x4E00 + i): "\U0001f600" * 256 for i in range(32)}


def test_a_watch_that_would_not_fit_in_the_listing_is_refused_and_listing_goes_on():
    async def run():
        servicer = bare_servicer(max_reply_bytes=LIMIT_BYTES)
        config = load_config(None)
        servicer.watches = WatchRegistry(InMemoryWatchStore(), servicer.coordinator, servicer.metrics, config)
        options = [("grpc.max_send_message_length", LIMIT_BYTES), ("grpc.max_receive_message_length", LIMIT_BYTES)]
        async with served(servicer, options) as stub:
            created, refusal = 0, None
            for index in range(20):
                request = pb.CreateWatchRequest(watch_id=f"w{index}", question="a truck?", labels=LABELS)
                try:
                    await stub.CreateWatch(request)
                except grpc.aio.AioRpcError as err:
                    refusal = err
                    break
                created += 1
            listed = await stub.ListWatches(pb.ListWatchesRequest())
            return created, refusal, listed

    created, refusal, listed = asyncio.run(run())
    assert refusal is not None and refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ListWatches" in refusal.details() and "max_message_bytes" in refusal.details()
    assert created >= 1 and len(listed.watches) == created
