"""A value a client sent that is far too long (an id, a time zone, a question) gets INVALID_ARGUMENT and a sentence
that quotes only its start, or its length, over a real gRPC channel: gRPC refuses a status message over 16 KiB with
RESOURCE_EXHAUSTED and no sentence, which reads as "retry later". And PushFrames' answer lists each refused
frame's id cut short, so one good frame among many of an over-long id still gets its per-frame answer, under the
message size limit.

The router's real servicer and coordinator, with no worker: the calls are refused before any is asked, except the
push of the one good frame, which a stand-in for the worker's push accepts.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from bare_router import bare_servicer, served

from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.worker_results import PushResult

LONG_ID = "x" * 20_000  # letters only, too long: a plain mistake (e.g. a pasted blob), not an attack


async def _frames():
    yield pb.Frame(stream_id=LONG_ID, timestamp_s=1.0, encoded=b"\xff\xd8\xff")


CALLS = {
    "GetStream": lambda stub: stub.GetStream(pb.GetStreamRequest(stream_id=LONG_ID)),
    "DeleteStream": lambda stub: stub.DeleteStream(pb.DeleteStreamRequest(stream_id=LONG_ID)),
    "GetKeyframes": lambda stub: stub.GetKeyframes(pb.GetKeyframesRequest(stream_id=LONG_ID, latest=True)),
    "PushFrames": lambda stub: stub.PushFrames(_frames()),
    "CreateStream": lambda stub: stub.CreateStream(pb.CreateStreamRequest(stream_id=LONG_ID)),
    "Query": lambda stub: _first(stub.Query(pb.QueryRequest(question="what?", stream_ids=[LONG_ID]))),
    "Query(question)": lambda stub: _first(stub.Query(pb.QueryRequest(question=LONG_ID, stream_ids=["cam"]))),
    "CreateWatch(watch_id)": lambda stub: stub.CreateWatch(pb.CreateWatchRequest(watch_id=LONG_ID, question="q")),
    "CreateWatch(active hours)": lambda stub: stub.CreateWatch(
        pb.CreateWatchRequest(question="q", active_hours=pb.ActiveHours(start="\u4e2d" * 20_000, end="02:00"))
    ),
    "CreateWatch(timezone)": lambda stub: stub.CreateWatch(
        pb.CreateWatchRequest(question="q", active_hours=pb.ActiveHours(start="01:00", end="02:00", timezone=LONG_ID))
    ),
}


async def _first(call):
    async for _ in call:
        break


@pytest.mark.parametrize("name", list(CALLS))
def test_an_overlong_id_is_invalid_argument_with_a_sentence(name):
    async def run():
        async with served(bare_servicer()) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await CALLS[name](stub)
            return caught.value

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code().name}: {(err.details() or '')[:160]}"
    assert "20000 characters" in err.details() and len(err.details()) < 1000  # the value's start, or its length


MAX_MESSAGE = 16 * 1024 * 1024  # ServiceConfig.max_message_bytes' default
RAW = pb.RawFrame(rgb=bytes(2 * 2 * 3), height=2, width=2, channels=3)


def test_one_good_frame_among_many_of_an_overlong_id_gets_a_per_frame_answer():
    bad_id = "x" * 200_000

    async def run():
        servicer = bare_servicer()
        servicer.coordinator.placement = {"cam": 0}

        async def push(frames):  # the worker's push, which takes the good frame
            return PushResult(accepted=len(frames))

        servicer.coordinator.push = push

        async def frames():
            yield pb.Frame(stream_id="cam", timestamp_s=1.0, raw=RAW)
            for i in range(100):
                yield pb.Frame(stream_id=bad_id, timestamp_s=2.0 + i, raw=RAW)

        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        async with served(servicer, options) as stub:
            return await stub.PushFrames(frames())

    answer = asyncio.run(run())
    assert answer.frames_accepted == 1 and answer.frames_rejected == 100
    assert len(answer.errors) == 100 and all(len(e.stream_id) < 200 and len(e.reason) < 500 for e in answer.errors)
    assert answer.errors[0].stream_id.startswith("x" * 128) and "200000 characters" in answer.errors[0].stream_id


@pytest.mark.parametrize("char", ["x", "%", "\u4e2d", "\U0001f600"])
def test_a_status_message_of_any_characters_reaches_the_client_with_its_code(char):
    """gRPC sends a status message percent-encoded (other than printable ASCII, three bytes for each UTF-8 byte), so
    the cut is by that size, not by characters: 50,000 of any character still arrive as INVALID_ARGUMENT."""
    from mosaic_core.errors import InvalidArgumentError
    from services.errors import abort

    text = char * 50_000

    async def refuse(request, context):
        await abort(context, InvalidArgumentError(text))

    async def run():
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(refuse)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test", {"Refuse": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test/Refuse")(b"")
                return caught.value
        finally:
            await server.stop(0)

    err = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code().name}: {(err.details() or '')[:160]}"
    assert err.details().startswith(char * 10) and "50000 characters" in err.details()
