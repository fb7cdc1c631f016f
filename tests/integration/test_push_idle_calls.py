"""A PushFrames call that sends nothing for ``push_idle_timeout_s`` ends, so calls a client forgot, or whose client
died without closing its connection, do not hold the server's ``max_push_calls`` slots from every other camera."""

from __future__ import annotations

import asyncio

import grpc
from bare_router import bare_servicer, served

from services.gen.mosaic.v1 import mosaic_pb2 as pb

IDLE_S = 0.5


def test_idle_push_calls_end_and_free_their_slots_while_a_busy_one_goes_on():
    servicer = bare_servicer()  # max_push_calls=4
    servicer.pushes.idle_timeout_s = IDLE_S

    async def run():
        async with served(servicer) as stub:
            idle = [stub.PushFrames() for _ in range(servicer.pushes.max_calls)]  # open, and never written to
            await asyncio.sleep(0.1)
            with_no_room = await _code(stub.PushFrames())
            idle_ends = await asyncio.wait_for(asyncio.gather(*map(_code, idle)), 10 * IDLE_S)
            busy = stub.PushFrames()  # one frame every 0.2 s for 1.6 s: never idle for IDLE_S
            for step in range(8):
                await busy.write(pb.Frame(stream_id="cam", timestamp_s=float(step), encoded=b"\xff\xd8\xff"))
                await asyncio.sleep(0.2)
            await busy.done_writing()
            return with_no_room, idle_ends, await _code(busy)

    with_no_room, idle_ends, busy_end = asyncio.run(run())
    assert with_no_room[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for code, details in idle_ends:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert f"no frame arrived for {IDLE_S:g} s" in details and "0 frames" in details
    # Admitted once the idle calls went; its frames, all refused (the stream is unknown), end it, not the timeout.
    assert busy_end[0] == grpc.StatusCode.INVALID_ARGUMENT, busy_end


async def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""
