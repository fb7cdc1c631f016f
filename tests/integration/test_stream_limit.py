"""CreateStream past the server's stream limit (``max_streams_per_worker`` for each worker) is RESOURCE_EXHAUSTED with
a sentence, counted in ``mosaic_errors_total``, and asks no worker; below it, the create goes on to the workers."""

from __future__ import annotations

import asyncio

import grpc
from bare_router import bare_servicer, served

from services.gen.mosaic.v1 import mosaic_pb2 as pb


def test_creates_past_the_stream_limit_are_refused_before_any_worker_is_asked():
    servicer = bare_servicer()  # no workers: a create that reaches them finds no room
    servicer.max_streams = 3
    servicer.coordinator.placement.update({"cam-1": 0, "cam-2": 0, "cam-3": 0})

    async def run():
        async with served(servicer) as stub:
            answers = []
            for stream_id in ("cam-4", "cam-1"):
                try:
                    await stub.CreateStream(pb.CreateStreamRequest(stream_id=stream_id, fps=1.0))
                except grpc.aio.AioRpcError as err:
                    answers.append((err.code(), err.details()))
            del servicer.coordinator.placement["cam-3"]
            try:
                await stub.CreateStream(pb.CreateStreamRequest(stream_id="cam-4", fps=1.0))
            except grpc.aio.AioRpcError as err:
                answers.append((err.code(), err.details()))
            return answers

    (full, existing, below) = asyncio.run(run())
    assert full[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has 3 streams" in full[1] and "limit (3: max_streams_per_worker for each worker)" in full[1], full[1]
    assert "limit" not in existing[1], existing  # an id the server has already gets the answer it always got
    assert "limit" not in below[1], below  # below the limit the coordinator is asked (here it has no workers)
    refused = servicer.metrics.registry.get_sample_value("mosaic_errors_total", {"code": "RESOURCE_EXHAUSTED"})
    assert refused == 1  # the refusal past the limit
