"""Questions the router answers itself, before any worker is asked: the status and sentence a client gets over a real
gRPC channel. The router's real servicer and coordinator, with no worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from bare_router import bare_servicer, served

from services.gen.mosaic.v1 import mosaic_pb2 as pb


async def _ask(stub, request: pb.QueryRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Query(request):
            pass
    return caught.value


@pytest.mark.parametrize("stream_ids", [[], ["cam-1"]], ids=["every-stream", "one-stream"])
def test_a_question_while_the_workers_restore_their_streams_is_unavailable(stream_ids):
    """Until the workers have said which streams they hold, the router knows none: a question about every stream is
    UNAVAILABLE (retry shortly) like one naming a stream, not NOT_FOUND ("create one first"), which a client takes
    for a final answer although the streams exist."""

    async def run():
        servicer = bare_servicer()
        servicer.coordinator.started = False  # as from the router's start until the workers answer
        async with served(servicer) as stub:
            return await _ask(stub, pb.QueryRequest(question="what moved?", stream_ids=stream_ids))

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "starting" in err.details() and "retry" in err.details()


def test_a_question_about_every_stream_when_there_is_none_says_so():
    async def run():
        async with served(bare_servicer()) as stub:
            return await _ask(stub, pb.QueryRequest(question="what moved?"))

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no streams to ask about" in err.details()
