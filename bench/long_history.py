"""One cluster-mode engine over a long stream, warmed up: what ``question_setup`` and ``question_timeline`` ask.

Scenario A's settings (``mosaic bench engine``): the looped sample clip ingested in calls of 64 frames, then every
warm-up question twice (compiles, captures every length's graphs, and settles what questions promote).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

from mosaic_core.bench.settings import engine_config, pinned_bytes, settings_for, sized_to_machine
from mosaic_core.bench.workload import CLIPS, QUESTIONS, looped_frames
from mosaic_core.engine.engine import Engine
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter


@dataclass
class LongHistory:
    engine: Engine
    frames: list  # the history, then the frames that come after it
    bulk: int  # frames of history ingested
    clusters: int
    minutes: float


def add_arguments(parser: argparse.ArgumentParser, *, questions: int, questions_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny preset, one minute of history; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--questions", type=int, default=questions, help=questions_help)
    parser.add_argument("--gap", type=int, default=8, help="frames ingested before a question (scenario A: 8)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warmed_up(
    args, *, frames_after: int, device_budget_gib: float = 8.0, pin_history: bool = False, **config
) -> LongHistory:
    """The engine, ``args.minutes`` of history ingested and warmed up, with ``frames_after`` more frames ready.
    ``config`` overrides ``EngineConfig`` fields; with ``--quick`` a ``device_budget_gib`` other than scenario A's
    8 replaces the quick preset's own; ``pin_history`` pins host memory for the history up front, as scenario A
    does, so that no question waits for memory to be pinned."""
    s = settings_for(
        quick=args.quick, model=args.model, minutes=args.minutes, questions=args.questions,
        budget_tokens=16384, device_budget_gib=device_budget_gib, cameras=1,
    )  # fmt: skip
    if args.quick and device_budget_gib != 8.0:
        s = dataclasses.replace(s, device_budget_bytes=int(device_budget_gib * 2**30))
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    s = sized_to_machine(s, model, None, log)
    bulk = int(s.minutes * 60)
    if pin_history:
        config["pinned_host_bytes"] = pinned_bytes(bulk * s.tokens_per_frame * model.kv_spec.bytes_per_token, s)
    engine = Engine(model, dataclasses.replace(engine_config(s, "cluster"), **config))
    engine.open_stream("cam")
    frames = looped_frames(bulk + frames_after, stream_id="cam", clip=CLIPS[0])
    started = time.perf_counter()
    for first in range(0, bulk, 64):
        engine.ingest(frames[first : min(first + 64, bulk)])
    clusters = len(engine.clusters("cam"))
    log(f"ingested {bulk} frames in {time.perf_counter() - started:.1f} s; {clusters} clusters")
    for question in QUESTIONS * 2:
        engine.answer("cam", question, max_new_tokens=1)
    return LongHistory(engine, frames, bulk, clusters, s.minutes)
