"""A worker that runs for long keeps a constant footprint: counted in live objects and tensor bytes, not timed.

An in-process worker (real engine, tiny preset, data directory, retention) ingests lap after lap of frames on
two cameras and answers questions between laps. After warm-up, the number of live Python objects of each type
and the bytes of live tensors must stop growing; once every stream is deleted, tensor bytes go back down.
"""

from __future__ import annotations

import collections
import gc
import time

import torch

from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import Answer
from services.config import load_config
from services.metadata import StreamRecord
from services.metadata.memory import InMemoryMetadataStore
from services.worker import WorkerCore

CAMERAS = ("m-a", "m-b")
FPS = 4.0


def _footprint() -> tuple[collections.Counter, int]:
    gc.collect()
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects)
    tensors = {id(o): o for o in objects if isinstance(o, torch.Tensor)}
    return types, sum(t.untyped_storage().nbytes() for t in tensors.values())


def _lap(worker: WorkerCore, frames, start_s: float) -> float:
    for stream_id in CAMERAS:
        items = [(i, stream_id, start_s + i / FPS, rgb) for i, (_, rgb) in enumerate(frames)]
        assert not worker.push(items).rejected
    target = {s: worker.telemetry.totals(s).received for s in CAMERAS}
    deadline = time.monotonic() + 120
    while any(worker.telemetry.totals(s).ingested + worker.telemetry.totals(s).dropped < target[s] for s in CAMERAS):
        assert time.monotonic() < deadline, "ingest did not finish"
        time.sleep(0.05)
    for stream_id in CAMERAS:
        events = list(worker.ask(f"q-{stream_id}-{start_s}", stream_id, "what moved?", 2, None, 60.0))
        assert isinstance(events[-1], Answer)
    worker.loop.call(lambda: None)
    return start_s + len(frames) / FPS + 1.0


def test_footprint_stops_growing_and_falls_when_streams_go(tiny_model, bikes_frames, tmp_path):
    config = load_config(
        None,
        data_dir=str(tmp_path),
        ingest_queue_frames=64,
        freeze_heap_after_start=False,  # gc.get_objects() does not list frozen objects: count them all
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    engine = Engine(tiny_model, config.engine_config(worker_subdir="w0"))
    worker = WorkerCore("0", config, store=InMemoryMetadataStore(), engine=engine).wait_started(60)
    frames = bikes_frames[:24]
    try:
        _, empty_bytes = _footprint()
        for stream_id in CAMERAS:
            worker.open_stream(StreamRecord(stream_id=stream_id, fps=FPS, retention_s=4.0))
        clock_s, sizes = 0.0, []
        for lap in range(6):
            clock_s = _lap(worker, frames, clock_s)
            pass_at_s = time.monotonic() + 60 * (lap + 1)  # the loop's own pass is rate-limited: run one now
            for stream_id in CAMERAS:
                worker.loop.call(worker.tier_sync.apply_retention, stream_id, 4.0, now_s=pass_at_s)
            types, tensor_bytes = _footprint()
            sizes.append(tensor_bytes)
            if lap == 2:
                warm_types = types
        grown = {k: n - warm_types[k] for k, n in types.items() if n - warm_types[k] > 200}
        assert not grown, f"live objects grew after warm-up: {grown}"
        for stream_id in CAMERAS:
            worker.close_stream(stream_id)
        _, after_bytes = _footprint()
        # What the streams held, as closing them freed it: a difference to the empty worker's bytes would count a
        # previous test's garbage that went meanwhile (a fresh-clone run measured -268 MB held that way).
        held = sizes[-1] - after_bytes
        assert held > 0, (sizes, after_bytes)
        grown = max(sizes[3:]) - max(sizes[:3])
        assert grown <= 0.1 * held, f"tensor bytes grew after warm-up by {grown}, the streams holding {held}: {sizes}"
        assert after_bytes - empty_bytes < 0.25 * (sizes[-1] - empty_bytes), (empty_bytes, sizes, after_bytes)
    finally:
        worker.shutdown()
