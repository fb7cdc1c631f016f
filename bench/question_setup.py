"""A question's set-up and first token at a long history, small uploads through the ring and without, in one process.

    python -m bench.question_setup [--minutes 60] [--questions 20] --out FILE.json

One cluster-mode engine with scenario A's settings (``mosaic bench engine``) over the looped sample clip; warm-up
questions capture the graphs. Then each question is asked twice in a row, once with ``transfer.upload`` staging
through the upload ring and once through a pinned block of its own (``transfer.UPLOAD_RING_ON``, flipped here in
the process, as ``MOSAIC_UPLOAD_RING=0`` would at start-up), alternating which goes first, and the medians of
``AnswerTimings.setup_s`` (choosing the candidates, the retriever, the plan and the device room) and of the time to
first token are printed side by side. Last, the set-up of a few more questions (ring on) runs under cProfile, and
the functions with the most host time are printed and written with the JSON: where the set-up's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

from mosaic_core.bench.engine import CLIPS, QUESTIONS, engine_config, looped_frames, settings_for, sized_to_machine
from mosaic_core.engine import questions
from mosaic_core.engine.engine import Engine
from mosaic_core.memory import transfer
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter


def _ask(engine: Engine, question: str, ring: bool):
    transfer.UPLOAD_RING_ON = ring
    try:
        return engine.answer("cam", question, max_new_tokens=1).timings
    finally:
        transfer.UPLOAD_RING_ON = True


def _profiled_setup(engine: Engine, asked: list[str]) -> str:
    """cProfile of the set-up alone: the profiler stops where the engine's clock for the forward pass starts."""
    profiler = cProfile.Profile()
    decode = questions._decode

    def stop_at_decode(*args):
        profiler.disable()
        return (yield from decode(*args))

    questions._decode = stop_at_decode
    try:
        for question in asked:
            profiler.enable()
            engine.answer("cam", question, max_new_tokens=1)
            profiler.disable()
    finally:
        questions._decode = decode
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler, stream=out).sort_stats("cumtime").print_stats(25)
    return f"# the set-up of {len(asked)} questions under cProfile\n" + out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.question_setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, a few minutes of history; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--questions", type=int, default=20, help="asked each way")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    s = settings_for(
        quick=args.quick, model=args.model, minutes=args.minutes, questions=args.questions,
        budget_tokens=16384, device_budget_gib=8.0, cameras=1,
    )  # fmt: skip
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    s = sized_to_machine(s, model, None, log)
    engine = Engine(model, engine_config(s, "cluster"))
    engine.open_stream("cam")
    frames = looped_frames(int(s.minutes * 60), stream_id="cam", clip=CLIPS[0])
    started = time.perf_counter()
    for first in range(0, len(frames), 64):
        engine.ingest(frames[first : first + 64])
    clusters = len(engine.clusters("cam"))
    log(f"ingested {len(frames)} frames in {time.perf_counter() - started:.1f} s; {clusters} clusters")
    for question in QUESTIONS * 2:  # compiles, captures every length's graphs, and settles what questions promote
        engine.answer("cam", question, max_new_tokens=1)
    timings: dict[str, list] = {"ring": [], "pinned block": []}
    for i in range(args.questions):
        question = QUESTIONS[i % len(QUESTIONS)]
        order = (True, False) if i % 2 == 0 else (False, True)
        for ring in order:
            timings["ring" if ring else "pinned block"].append(_ask(engine, question, ring))
    rows = {
        name: {
            "setup_p50_ms": statistics.median(t.setup_s for t in asked) * 1e3,
            "ttft_p50_ms": statistics.median(t.time_to_first_token_s for t in asked) * 1e3,
            "ttft_without_setup_p50_ms": statistics.median(t.time_to_first_token_s - t.setup_s for t in asked) * 1e3,
        }
        for name, asked in timings.items()
    }
    profile = _profiled_setup(engine, QUESTIONS * 2)
    print(f"{len(frames)} frames of history, {clusters} clusters, {args.questions} questions each way")
    print(f"{'uploads':>13} {'set-up p50 ms':>14} {'TTFT p50 ms':>12} {'TTFT less set-up':>17}")
    for name, row in rows.items():
        setup, ttft, rest = row["setup_p50_ms"], row["ttft_p50_ms"], row["ttft_without_setup_p50_ms"]
        print(f"{name:>13} {setup:>14.2f} {ttft:>12.2f} {rest:>17.2f}")
    print(profile)
    args.out.write_text(
        json.dumps({"minutes": s.minutes, "clusters": clusters, "rows": rows, "profile": profile}) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
