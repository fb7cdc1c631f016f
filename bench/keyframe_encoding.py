"""The engine thread's time per sealed cluster's keyframes, JPEGs encoded inline against on an encoder thread.

At 150 cameras on the H200 the service's engine thread spent 0.022-0.029 s/s at the two lines of Pillow that take a
thumbnail in for encoding, as clusters sealed (bench/NOTES.md, session 28's stack probe). This times that step
alone, with the engine thread kept busy the way the service keeps it: a fixed stretch of pure Python (which holds
the GIL, as queuing GPU work from Python does) before every frame offered. Thumbnails come from a sample clip at
the default size (160 px long side), three keyframes a cluster, one cluster sealed every ``--frames-per-cluster``
frames, on the tiny preset's engine (only its keyframe store and tier budgets are used).

    python -m bench.keyframe_encoding --out bench/results/cpu-s32-keyframe-encoding.json

Per setting (``keyframe_encode_threads`` 0 and 1, alternated ``--rounds`` times), per sealed cluster: the calling
thread's whole wall time (busy stretches, offers and seals: the same work either way, so the difference is what
encoding costs that thread, GIL taken by the encoder thread included), and the part outside the busy stretches.
Times on this machine's CPU, not the H200 host's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _busy(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def _thumbnails(clip: str, count: int, long_side_px: int):
    from mosaic_core.engine.thumbnails import thumbnail
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    frames = list(iter_video_frames(sample_clip_path(clip), fps=4.0, max_frames=count))
    return [thumbnail(f.rgb, long_side_px) for f in frames]


def run_once(model, thumbs, *, threads: int, clusters: int, frames_per_cluster: int, busy_iterations: int) -> dict:
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.engine import Engine
    from mosaic_core.engine.keyframe_store import store_for

    config = EngineConfig(keyframe_encode_threads=threads, device_budget_bytes=64 * MIB, host_budget_bytes=256 * MIB)
    engine = Engine(model, config)
    engine.open_stream("cam", fps=1.0)
    store = store_for(engine.parts, engine.stream("cam"))
    busy_s = []
    started = time.perf_counter()
    frame = 0
    for cluster in range(clusters + 1):  # the last one's first frame seals the one before it
        cluster_id = f"cam/c{cluster:06d}"
        for j in range(frames_per_cluster if cluster < clusters else 1):
            t = time.perf_counter()
            _busy(busy_iterations)
            busy_s.append(time.perf_counter() - t)
            small = thumbs[frame % len(thumbs)]
            similarity = None if j == 0 else 0.5 + 0.4 * ((frame * 7919) % 13) / 13
            store.offer(cluster_id, frame, float(frame), lambda small=small: small, similarity)
            frame += 1
    wall = time.perf_counter() - started
    kept = store.num_keyframes  # waits for the encoder: every sealed cluster's keyframes are held after this
    engine.close()
    return {
        "wall_s": wall,
        "wall_ms_per_cluster": wall / clusters * 1e3,
        "busy_s": sum(busy_s),
        "busy_median_us": statistics.median(busy_s) * 1e6,
        "outside_busy_ms_per_cluster": (wall - sum(busy_s)) / clusters * 1e3,
        "keyframes_held": kept,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="bikes.mp4")
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--frames-per-cluster", type=int, default=3)
    parser.add_argument("--busy-iterations", type=int, default=20_000, help="pure-Python loop before each frame")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    torch.set_num_threads(1)
    model = Qwen25VLAdapter.from_preset("tiny", device="cpu", dtype=torch.float32)
    thumbs = _thumbnails(args.clip, 48, 160)
    sizes = {
        "clusters": args.clusters,
        "frames_per_cluster": args.frames_per_cluster,
        "busy_iterations": args.busy_iterations,
    }
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for _ in range(args.rounds):
        for threads in (0, 1):
            runs[threads].append(run_once(model, thumbs, threads=threads, **sizes))
    summary = {}
    print(f"{args.clusters} clusters of {args.frames_per_cluster} frames, thumbnails {thumbs[0].shape[1]}x"
          f"{thumbs[0].shape[0]} from {args.clip}, {args.rounds} rounds (median)")  # fmt: skip
    print("encode threads | calling thread ms/cluster | of it outside the busy work | busy stretch median µs | held")
    for threads, rows in runs.items():
        wall = statistics.median(r["wall_ms_per_cluster"] for r in rows)
        outside = statistics.median(r["outside_busy_ms_per_cluster"] for r in rows)
        busy = statistics.median(r["busy_median_us"] for r in rows)
        summary[threads] = {"wall_ms_per_cluster": wall, "outside_busy_ms_per_cluster": outside, "busy_median_us": busy}
        print(f"{threads:>14} | {wall:>24.3f} | {outside:>27.3f} | {busy:>22.1f} | {rows[0]['keyframes_held']:>4}")
    if args.out:
        report = {"command": "python -m bench.keyframe_encoding " + " ".join(sys.argv[1:]), "args": dict(vars(args))}
        report["args"]["out"] = args.out.name
        report.update({"summary": summary, "runs": runs})
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
