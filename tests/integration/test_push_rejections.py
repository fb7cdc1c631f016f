"""A long PushFrames call of refused frames holds only the rejections its answer lists (the first 100) and a count,
not one per frame for the life of the call; the answer still counts them all.

The router's real servicer and coordinator; the frames name no valid stream, so they are refused before any worker.
The gRPC context only aborts the call, as grpc.aio's does, with its code and sentence.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import grpc
import pytest

from services.coordinator import Coordinator
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metrics import MosaicMetrics
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer

BAD_ID = "!" + "x" * 100


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Context:
    async def abort(self, code, details, trailing_metadata=()):
        raise _Aborted(code, details)


def _servicer() -> MosaicServicer:
    metrics = MosaicMetrics()
    coordinator = Coordinator([], None, metrics)
    coordinator.started = True
    queue = QueryQueue(max_waiting=4, max_running=1)
    return MosaicServicer(coordinator, queue, metrics, mode="cluster", default_max_new_tokens=8, max_push_calls=4)


def test_a_call_of_refused_frames_holds_no_memory_per_frame():
    marks: dict[int, int] = {}
    total, early = 40_000, 4_000

    async def frames():
        frame = pb.Frame(stream_id=BAD_ID, timestamp_s=1.0, encoded=b"\xff\xd8\xff")
        for i in range(total):
            if i in (early, total - 1):
                gc.collect()
                marks[i] = tracemalloc.get_traced_memory()[0]
            yield frame

    tracemalloc.start()
    try:
        with pytest.raises(_Aborted) as caught:
            asyncio.run(_servicer().PushFrames(frames(), _Context()))
    finally:
        tracemalloc.stop()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"all {total} frames" in str(caught.value)
    grown = marks[total - 1] - marks[early]
    assert grown < 1 << 20, f"{total - 1 - early} refused frames grew the router by {grown / 2**20:.1f} MiB"


def test_a_delete_before_the_watch_registry_is_up_is_refused_as_unavailable():
    # Workers serve from before the router's watch registry is up; a stream deleted then kept its cooldowns.
    servicer = _servicer()
    assert servicer.watches is None
    with pytest.raises(_Aborted) as caught:
        asyncio.run(servicer.DeleteStream(pb.DeleteStreamRequest(stream_id="cam-1"), _Context()))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "starting" in str(caught.value)
