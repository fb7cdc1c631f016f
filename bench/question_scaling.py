"""How much of the engine thread one question takes, as a camera's history grows.

One stream of the bikes clip, looped, is ingested a frame at a time (tiny preset on the CPU: what grows with the
history is the host's bookkeeping, which does not depend on the model's size). At each checkpoint of clusters held,
``--repeats`` questions of ``--tokens`` tokens are asked one after another, each timed from the call to its answer
(the engine thread's whole time for it: prefill, decode and the maintenance after it, where co-retrieval merges
are decided) and to its first token; one more is counted in Python function calls (``cProfile``), a figure that,
unlike the times, does not move with the machine's other load. Run it from two checkouts to compare them.

    python -m bench.question_scaling --out bench/results/cpu-question-scaling

Results: a table on stdout, the raw numbers in ``--out``.json and the table in ``--out``.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

STREAM = "cam"


def _ask(engine, tokens: int) -> tuple[float, float]:
    """One question's time to its first token and to its end, in seconds."""
    started, first = time.perf_counter(), None
    for _ in engine.ask(STREAM, "what happened?", max_new_tokens=tokens):
        if first is None:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def run(checkpoints: list[int], fps: float, repeats: int, tokens: int) -> list[dict]:
    import torch

    from bench.tiny_history import tiny_engine_and_clip
    from mosaic_core.engine.results import FrameInput

    torch.set_num_threads(1)  # the other core stays with whatever else runs; the model is tiny
    engine, clip = tiny_engine_and_clip(STREAM, fps)
    rows, offset_s, lap_s = [], 0.0, clip[-1][0] + 1.0 / fps
    for target in checkpoints:
        while len(engine.clusters(STREAM)) < target:
            for t, rgb in clip:
                engine.ingest([FrameInput(STREAM, offset_s + t, rgb)])
            offset_s += lap_s
        _ask(engine, tokens)  # the first question at this size pays for nothing the others do not
        timed = [_ask(engine, tokens) for _ in range(repeats)]
        profile = cProfile.Profile()
        profile.runcall(_ask, engine, tokens)
        rows.append(
            {
                "clusters": len(engine.clusters(STREAM)),
                "first_token_ms": 1e3 * statistics.median(first for first, _ in timed),
                "question_ms": 1e3 * statistics.median(whole for _, whole in timed),
                "python_calls": pstats.Stats(profile).total_calls,
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


HEADER = f"{'clusters':>8}  {'first token ms (median)':>23}  {'whole question ms (median)':>26}  {'Python calls':>12}"


def _line(row: dict) -> str:
    return (
        f"{row['clusters']:>8}  {row['first_token_ms']:>23.1f}  {row['question_ms']:>26.1f}  {row['python_calls']:>12}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="200,800,1600", help="clusters held at which to ask")
    parser.add_argument("--fps", type=float, default=4.0, help="frames a second taken from the clip")
    parser.add_argument("--repeats", type=int, default=9, help="questions timed at each checkpoint")
    parser.add_argument("--tokens", type=int, default=4, help="tokens of each answer")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.txt")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    rows = run([int(n) for n in args.checkpoints.split(",")], args.fps, args.repeats, args.tokens)
    if args.out:
        command = "python -m bench.question_scaling " + " ".join(sys.argv[1:] if argv is None else argv)
        commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
        report = {"command": command, "commit": commit, "repeats": args.repeats, "rows": rows}
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
        Path(f"{args.out}.txt").write_text("\n".join([f"{command} (at {commit})", HEADER, *map(_line, rows)]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
