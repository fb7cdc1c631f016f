"""A question's set-up and first token at a long history, asked right after an ingest call or not, in one process.

    python -m bench.question_setup [--minutes 60] [--questions 20] [--gap 8] --out FILE.json

One cluster-mode engine with scenario A's settings (``mosaic bench engine``) over the looped sample clip; warm-up
questions capture the graphs. Then each question is asked twice: once right after an ingest call of ``--gap``
frames, as scenario A asks its timed questions, and once right after the previous answer, with no ingest between,
alternating which goes first. The medians of ``AnswerTimings.setup_s`` (choosing the candidates, the retriever, the
plan and the device room) and of the time to first token are printed side by side: a set-up that waits for the
device would take longer after an ingest call, whose work is still queued. Last, the set-up of more questions,
each after an ingest call, runs under cProfile, and the functions with the most host time are printed and written
with the JSON.

Session 28 measured scenario A's set-up at 2.5-3.5 ms p50 on the H200, and 1.3 ms for the same engine's questions
asked one after another with no ingest between (this script's earlier form); this form tells the two apart.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
from pathlib import Path

from bench import long_history
from mosaic_core.bench.workload import QUESTIONS
from mosaic_core.engine import questions
from mosaic_core.engine.engine import Engine


def _ask(engine: Engine, question: str, before: list):
    if before:
        engine.ingest(before)  # queued on the device: the question's set-up runs while it is still running
    return engine.answer("cam", question, max_new_tokens=1).timings


def _profiled_setup(engine: Engine, asked: list[str], more_frames) -> str:
    """cProfile of the set-up alone, each question after an ingest call of the next of ``more_frames`` (lists of
    frames): the profiler stops where the engine's clock for the forward pass starts."""
    profiler = cProfile.Profile()
    decode = questions._decode

    def stop_at_decode(*args):
        profiler.disable()
        return (yield from decode(*args))

    questions._decode = stop_at_decode
    try:
        for question, frames in zip(asked, more_frames, strict=True):
            engine.ingest(frames)
            profiler.enable()
            engine.answer("cam", question, max_new_tokens=1)
            profiler.disable()
    finally:
        questions._decode = decode
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    pstats.Stats(profiler, stream=out).sort_stats("cumtime").print_stats(25)
    return f"# the set-up of {len(asked)} questions, each after an ingest call, under cProfile\n" + out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.question_setup", description=__doc__.split("\n\n")[0])
    long_history.add_arguments(parser, questions=20, questions_help="asked each way")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    profiled = 2 * len(QUESTIONS)
    history = long_history.warmed_up(args, frames_after=(args.questions + profiled) * args.gap)
    engine, frames, bulk, clusters = history.engine, history.frames, history.bulk, history.clusters
    more = [frames[i : i + args.gap] for i in range(bulk, len(frames), args.gap)]  # one list before each question
    timings: dict[str, list] = {"after ingest": [], "no ingest": []}
    for i in range(args.questions):
        question = QUESTIONS[i % len(QUESTIONS)]
        for after_ingest in (True, False) if i % 2 == 0 else (False, True):
            before = more[i] if after_ingest else []
            timings["after ingest" if after_ingest else "no ingest"].append(_ask(engine, question, before))
    rows = {
        name: {
            "setup_p50_ms": statistics.median(t.setup_s for t in asked) * 1e3,
            "ttft_p50_ms": statistics.median(t.time_to_first_token_s for t in asked) * 1e3,
            "ttft_without_setup_p50_ms": statistics.median(t.time_to_first_token_s - t.setup_s for t in asked) * 1e3,
        }
        for name, asked in timings.items()
    }
    profile = _profiled_setup(engine, QUESTIONS * 2, more[args.questions :])
    print(f"{bulk} frames of history, {clusters} clusters, {args.questions} questions each way, gap {args.gap} frames")
    print(f"{'asked':>13} {'set-up p50 ms':>14} {'TTFT p50 ms':>12} {'TTFT less set-up':>17}")
    for name, row in rows.items():
        setup, ttft, rest = row["setup_p50_ms"], row["ttft_p50_ms"], row["ttft_without_setup_p50_ms"]
        print(f"{name:>13} {setup:>14.2f} {ttft:>12.2f} {rest:>17.2f}")
    print(profile)
    report = {"minutes": history.minutes, "gap": args.gap, "clusters": clusters, "rows": rows, "profile": profile}
    args.out.write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
