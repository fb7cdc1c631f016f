"""Bytes that keyframes add per cluster, at the default thumbnail settings, on the sample clips.

Each clip is ingested by one engine (tiny preset, random weights: cluster boundaries come from its vision
embeddings, so counts per cluster are what formation with those weights gives), then every sealed cluster's
keyframes are measured. The table also puts them next to the cluster's KV at the 7B benchmark shape (57,344 bytes
a token: 28 layers x 2 KiB), the unit the tier budgets hold.

    python -m bench.keyframes --out bench/results/cpu-keyframe-bytes      # all four clips at 2 fps

Results: a table on stdout, the raw numbers in ``--out``.json (the command line heads the .txt copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")
KV_BYTES_PER_TOKEN_7B = 28 * 2048


def measure_clip(model, clip: str, *, fps: float, max_frames: int, config) -> dict:
    from mosaic_core.engine.engine import Engine
    from mosaic_core.engine.results import FrameInput
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    engine = Engine(model, config)
    engine.open_stream("cam", fps=fps)
    frames = list(iter_video_frames(sample_clip_path(clip), fps=fps, max_frames=max_frames))
    started = time.perf_counter()
    for i in range(0, len(frames), 8):
        engine.ingest([FrameInput("cam", f.timestamp_s, f.rgb) for f in frames[i : i + 8]])
    engine.checkpoint()  # seals the last cluster, so every frame is in a measured cluster
    per_cluster, per_keyframe, tokens, sizes = [], [], [], set()
    for record in engine.stream("cam").former.records():
        keyframes = engine.keyframes("cam", cluster_id=record.cluster_id)
        per_cluster.append(sum(k.num_bytes for k in keyframes))
        per_keyframe.extend(k.num_bytes for k in keyframes)
        tokens.append(record.num_tokens)
        sizes.update((k.width, k.height) for k in keyframes)
    stats = engine.stats()
    kv_7b = [n * KV_BYTES_PER_TOKEN_7B for n in tokens]
    return {
        "clip": clip,
        "frames": len(frames),
        "frame_size": list(frames[0].rgb.shape[:2]),
        "thumbnail_sizes": sorted(sizes),
        "clusters": len(per_cluster),
        "keyframes": len(per_keyframe),
        "bytes_per_keyframe_mean": statistics.mean(per_keyframe),
        "bytes_per_cluster_mean": statistics.mean(per_cluster),
        "bytes_per_cluster_median": statistics.median(per_cluster),
        "bytes_per_cluster_max": max(per_cluster),
        "engine_keyframe_bytes": stats.keyframe_bytes,
        "keyframes_dropped": stats.keyframes_dropped,
        "tokens_per_cluster_mean": statistics.mean(tokens),
        "share_of_7b_kv": sum(per_cluster) / sum(kv_7b),
        "ingest_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", default=list(CLIPS))
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-frames", type=int, default=120)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.txt")
    args = parser.parse_args(argv)

    import torch

    from mosaic_core.config import EngineConfig
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    model = Qwen25VLAdapter.from_preset(args.model, device="cpu", dtype=torch.float32)
    config = EngineConfig()  # keyframes at their defaults: 3 a cluster, 160 px on the long side, JPEG quality 75
    header = (
        f"{' '.join(['python -m bench.keyframes', *(argv if argv is not None else sys.argv[1:])])}\n"
        f"model {args.model} (random weights), {args.fps} fps, defaults: {config.keyframes_per_cluster} keyframes a "
        f"cluster, {config.keyframe_long_side_px} px long side, JPEG quality {config.keyframe_jpeg_quality}\n"
    )
    rows = []
    for clip in args.clips:
        print(f"measuring {clip} ...", file=sys.stderr, flush=True)
        rows.append(measure_clip(model, clip, fps=args.fps, max_frames=args.max_frames, config=config))
    lines = [
        f"{'clip':>24} | frames | frame px | thumb px | clusters | keyframes | B/keyframe | B/cluster mean | "
        "median |    max | of 7B KV",
        "-" * 128,
    ]
    for r in rows:
        h, w = r["frame_size"]
        thumbs = ",".join(f"{tw}x{th}" for tw, th in r["thumbnail_sizes"])
        lines.append(
            f"{r['clip']:>24} | {r['frames']:6d} | {w:>4}x{h:<3} | {thumbs:>8} | {r['clusters']:8d} | "
            f"{r['keyframes']:9d} | {r['bytes_per_keyframe_mean']:10.0f} | {r['bytes_per_cluster_mean']:14.0f} | "
            f"{r['bytes_per_cluster_median']:6.0f} | {r['bytes_per_cluster_max']:6d} | {r['share_of_7b_kv']:8.5%}"
        )
    table = "\n".join(lines)
    print(header + "\n" + table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text("$ " + header + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
