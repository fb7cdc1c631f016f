"""Pushed frames are decoded on threads of their own, not on the event loop's default executor, whose threads the
router's watch store reads (and webhook posts) take: a Redis that stops answering holds every default thread a
ListWatches call took, and on those threads a pushed frame was not decoded until Redis answered again.

The router's real servicer, watch registry and gRPC server, on the session's real redis-server (frozen by SIGSTOP);
no worker: the frames name a stream no worker has, which is answered only after the frame was decoded (a frame that
cannot be decoded is refused as INVALID_ARGUMENT before that).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from bare_router import bare_servicer, served

from services.config import load_config
from services.frames import encode_image
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metadata.watches import RedisWatchStore
from services.router import MosaicServer
from services.scheduler import QueryQueue
from services.watches import WatchRegistry

DEFAULT_THREADS = 2  # the event loop's default executor here: few, so that few held reads fill it
PUSH_TIMEOUT_S = 10.0  # a frame of 64x48 pixels decodes in milliseconds; this is only the margin of a loaded machine
HELD_CHECKS = 40  # how often to look whether the held reads took every default thread, PROBE_S each
PROBE_S = 0.25


def _jpeg_frame(stream_id: str) -> pb.Frame:
    rgb = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 64, 3))
    return pb.Frame(stream_id=stream_id, timestamp_s=1.0, encoded=encode_image(np.ascontiguousarray(rgb), "jpeg"))


async def _default_threads_held(loop: asyncio.AbstractEventLoop) -> None:
    """Returns once a no-op given to the default executor does not run within ``PROBE_S``: every thread is taken."""
    for _ in range(HELD_CHECKS):
        probe = loop.run_in_executor(None, lambda: None)
        done, _ = await asyncio.wait([probe], timeout=PROBE_S)
        if not done:
            return
    raise AssertionError(f"the held store reads did not take the {DEFAULT_THREADS} default threads")


def test_a_pushed_frame_is_decoded_while_a_hung_store_holds_every_default_thread(
    redis_client, frozen_redis, redis_namespace
):
    async def run():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(DEFAULT_THREADS))
        servicer = bare_servicer(decode_threads=1)
        registry = WatchRegistry(RedisWatchStore(redis_client, namespace=redis_namespace), servicer.coordinator,
                                 servicer.metrics, load_config(None))  # fmt: skip
        await registry.start()
        servicer.watches = registry
        try:
            async with served(servicer) as stub:
                with frozen_redis():
                    listings = [asyncio.ensure_future(stub.ListWatches(pb.ListWatchesRequest(), timeout=60))
                                for _ in range(DEFAULT_THREADS)]  # fmt: skip
                    await _default_threads_held(loop)
                    started_s = time.monotonic()
                    try:
                        await stub.PushFrames(iter([_jpeg_frame("nowhere")]), timeout=PUSH_TIMEOUT_S)
                        raise AssertionError("a frame of a stream no worker has was accepted")
                    except grpc.aio.AioRpcError as err:
                        refusal, waited_s = (err.code(), err.details()), time.monotonic() - started_s
                assert refusal[0] == grpc.StatusCode.NOT_FOUND and "unknown stream" in refusal[1], (refusal, waited_s)
                replies = await asyncio.wait_for(asyncio.gather(*listings), 60)  # Redis answers again
                assert all(list(r.watches) == [] for r in replies)
        finally:
            servicer.close()
            await registry.stop_polls()
            await registry.close()

    asyncio.run(run())


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mosaic-decode")]


def test_the_router_lets_its_decode_threads_go_when_it_stops():
    config = load_config(None, host="127.0.0.1", grpc_port=0, metrics_port=0, shutdown_drain_s=0.0, decode_threads=3)
    assert not _decode_threads()

    async def run():
        server = MosaicServer(config)
        await server._start_grpc(QueryQueue(max_waiting=1, max_running=1))
        server.coordinator.started = True
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = mosaic_pb2_grpc.MosaicStub(channel)
            try:
                await stub.PushFrames(iter([_jpeg_frame("nowhere")] * 4), timeout=PUSH_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert _decode_threads(), "no pushed frame was decoded on the decode threads"
        await server.stop(0)

    asyncio.run(run())
    deadline_s = time.monotonic() + 10.0
    while _decode_threads() and time.monotonic() < deadline_s:
        time.sleep(0.05)
    assert not _decode_threads(), [t.name for t in _decode_threads()]
