"""Decode with several questions at once: ms per step and tokens/s for 1, 2, 4, 8 and 16 answers on different cameras.

    mosaic bench decode --out FILE.json                 # GPU, qwen2.5-vl-7b shape
    mosaic bench decode --quick --out FILE.json         # CPU, tiny preset: fixed-buffer steps run eagerly

One cluster-mode engine holds ``--cameras`` cameras, each with ``--minutes`` of a looped sample clip (the clips of
``--clips`` in turn, by default the three). For each concurrency n, n answers of ``--decode-tokens`` tokens start on n
different cameras and are read in turn, as the service's engine loop reads its running answers. Three runs per n,
with the same CUDA graphs for prefill and decode:

- ``one at a time``: decode steps take one answer each (``DecodeGraphs.max_batch`` 1);
- ``batched``: every running answer steps in one batch (up to ``MAX_BATCH``);
- ``one at a time, again``: the control for equal tokens. Each answer promotes what it retrieved to the device,
  so a repeat reads the same KV in another order; random weights put next-token logits close together, and a
  later token can flip.

Reported per run: wall time from the last answer's first token to the last token, tokens per second over all
answers, ms per step (what one answer waits per token), and answers equal in tokens to the control run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from mosaic_core.bench.settings import engine_config, pinned_bytes, settings_for, sized_to_machine
from mosaic_core.bench.workload import CLIPS, QUESTIONS, clip_list, looped_frames
from mosaic_core.config import GIB, MIB, RetrievalMode
from mosaic_core.engine.decode_graphs import MAX_BATCH, DecodeGraphs
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import TokenEvent
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_concurrent(engine: Engine, cameras: list[str], decode_tokens: int, while_decoding=None) -> dict:
    """Starts one answer per camera, reads them in turn to the end; returns the timings and the answers' tokens.

    ``while_decoding``, a context manager, is entered after the prefills and left after the last token (a profiler).
    """
    answers = [
        engine.ask(camera, QUESTIONS[i % len(QUESTIONS)], max_new_tokens=decode_tokens)
        for i, camera in enumerate(cameras)
    ]
    tokens: list[list[int]] = [[] for _ in answers]
    for i, answer in enumerate(answers):  # prefills: each answer's first token
        tokens[i].append(next(answer).token_id)
    graphs = engine.parts.decode_graphs
    steps_before = graphs.num_steps
    _sync()
    with while_decoding or contextlib.nullcontext():
        start = time.perf_counter()
        running = dict(enumerate(answers))
        while running:
            for i, answer in list(running.items()):
                event = next(answer)
                if isinstance(event, TokenEvent):
                    tokens[i].append(event.token_id)
                else:  # the Answer: this one is done
                    del running[i]
        _sync()
        wall = time.perf_counter() - start
    decoded = sum(len(t) - 1 for t in tokens)
    longest = max(len(t) - 1 for t in tokens)
    return {
        "answers": len(cameras),
        "decode_wall_ms": wall * 1e3,
        "tokens_decoded": decoded,
        "tokens_per_s": decoded / wall if wall else 0.0,
        "ms_per_step": wall / longest * 1e3 if longest else 0.0,
        "graph_steps": graphs.num_steps - steps_before,
        "tokens": tokens,
    }


def main_args(argv=None) -> argparse.Namespace:
    """The command line, checked whole before anything loads (a bad flag or value exits with argparse's usage
    error); adds ``num_cameras`` and ``levels``, the concurrencies to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 4 cameras; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=3.0, help="history per camera")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument(
        "--device-budget-gib", type=float, default=80.0, help="16 answers stage 16 working sets: 30 GiB at 16k tokens"
    )
    parser.add_argument(
        "--clips", type=clip_list, default=CLIPS,
        help="sample clips the cameras loop, in turn, comma-separated (a GPU run may carry one)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.num_cameras = cameras = 4 if args.quick else args.cameras
    try:
        levels = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: give counts of answers, comma-separated")
    args.levels = [n for n in levels if n <= cameras] if args.quick else levels
    if not args.levels or min(args.levels) < 1 or max(args.levels) > min(cameras, MAX_BATCH):
        parser.error(f"--concurrency {args.concurrency!r}: each count from 1 to --cameras ({cameras}) and {MAX_BATCH}")
    return args


def main(argv=None) -> int:
    args = main_args(argv)
    clips, levels, cameras = args.clips, args.levels, args.num_cameras
    s = settings_for(
        quick=args.quick, model=args.model, minutes=args.minutes, questions=len(QUESTIONS),
        budget_tokens=args.budget_tokens, device_budget_gib=args.device_budget_gib, cameras=args.cameras,
    )  # fmt: skip
    if args.quick:  # room for 4 answers' working sets next to 4 windows
        s = dataclasses.replace(s, device_budget_bytes=64 * MIB)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    s = sized_to_machine(s, model, None, log)
    seconds = max(8, int(s.minutes * 60))
    names = [f"cam{c:02d}" for c in range(cameras)]
    engine = _ingested_engine(model, s, names, clips, seconds, log)
    graphs = engine.parts.decode_graphs
    for n in sorted(set(levels)):  # warm-up: compiles kernels, captures every batch size's graphs
        graphs.max_batch = n
        run_concurrent(engine, names[:n], 4)
    rows = []
    for n in levels:
        rows.append(_compare_at(engine, names[:n], args.decode_tokens))
        log(f"n={n}: {json.dumps(rows[-1])}")
    report = {
        "model": s.model,
        "cameras": cameras,
        "minutes_per_camera": seconds / 60,
        "budget_tokens": s.budget_tokens,
        "decode_tokens": args.decode_tokens,
        "clips": list(clips),
        "device_budget_gib": s.device_budget_bytes / GIB,
        "graphs_captured": graphs.graph_pool.num_captured,
        "graph_failure": graphs.graph_pool.failure,
        "prefill_graphs_captured": engine.parts.prefill_graphs.graph_pool.num_captured,
        "rows": rows,
    }
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(_table(rows))
    return 0


def _ingested_engine(model, s, names: list[str], clips: tuple[str, ...], seconds: int, log) -> Engine:
    """A cluster-mode engine with ``seconds`` of the looped ``clips`` ingested on each camera of ``names``; on the
    CPU its decode steps run eagerly on the graphs' fixed buffers."""
    cameras = len(names)
    history_bytes = cameras * seconds * s.tokens_per_frame * model.kv_spec.bytes_per_token
    config = dataclasses.replace(
        engine_config(s, RetrievalMode.CLUSTER), pinned_host_bytes=pinned_bytes(history_bytes, s)
    )
    engine = Engine(model, config)
    if not torch.cuda.is_available():  # no graphs on the CPU: the same fixed-buffer steps, run eagerly
        engine.parts.decode_graphs = DecodeGraphs(
            model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True, capture=False
        )
    per_camera = [
        looped_frames(seconds, stream_id=name, clip=clips[c % len(clips)], start_s=0.0) for c, name in enumerate(names)
    ]
    for name in names:
        engine.open_stream(name)
    started = time.perf_counter()
    for second in range(seconds):
        engine.ingest([frames[second] for frames in per_camera])
        if second % 60 == 59:
            log(f"ingested {second + 1}/{seconds} s of {cameras} cameras")
    log(f"ingest: {cameras * seconds} frames in {time.perf_counter() - started:.1f} s")
    return engine


def _compare_at(engine: Engine, cameras: list[str], decode_tokens: int) -> dict:
    """One answer per camera of ``cameras`` at once, decoded one at a time, batched, then one at a time again (the
    control whose tokens the others are checked against)."""
    graphs = engine.parts.decode_graphs
    runs = {}
    for label, max_batch in (("one_at_a_time", 1), ("batched", MAX_BATCH), ("one_at_a_time_again", 1)):
        graphs.max_batch = max_batch
        runs[label] = run_concurrent(engine, cameras, decode_tokens)
    control = runs["one_at_a_time_again"]["tokens"]
    row = {"concurrent_answers": len(cameras)}
    for label, run in runs.items():
        row[label] = {k: v for k, v in run.items() if k != "tokens"}
        row[label]["answers_equal_to_control"] = sum(a == b for a, b in zip(run["tokens"], control, strict=True))
    single = runs["one_at_a_time"]["tokens_per_s"]
    row["batched_speedup"] = runs["batched"]["tokens_per_s"] / single if single else None
    return row


def _table(rows: list[dict]) -> str:
    lines = [
        "| answers | one at a time: ms/step, tokens/s | batched: ms/step, tokens/s | speedup | equal to control |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        single, batched = row["one_at_a_time"], row["batched"]
        lines.append(
            f"| {row['concurrent_answers']} | {single['ms_per_step']:.2f}, {single['tokens_per_s']:.1f} "
            f"| {batched['ms_per_step']:.2f}, {batched['tokens_per_s']:.1f} | {row['batched_speedup']:.2f}x "
            f"| {batched['answers_equal_to_control']}/{row['concurrent_answers']} batched, "
            f"{single['answers_equal_to_control']}/{row['concurrent_answers']} one at a time |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
