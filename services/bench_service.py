"""``mosaic bench service``: how many real-time cameras one real ``mosaic serve`` keeps, measured through gRPC.

Starts ``redis-server`` and ``mosaic serve`` (a router and one Ray worker; the tiny preset on the CPU with
``--quick``, else ``--model`` on one GPU) as child processes on loopback, then raises the number of cameras N
step by step (``--cameras 32,64,...``). At each step it adds cameras up to N:

- a share of them (``--pulled-share``) are server-pulled sources: the clip, looped, under a source root, which
  the worker decodes with PyAV and paces to real time;
- the rest are pushed as JPEG from ``--push-clients`` concurrent PushFrames clients, one frame per camera every
  1/fps seconds, each carrying its camera's clock (JPEGs are encoded once, before the run), counting the frames
  they send and skip;

while questions fall due at ``--questions-per-s``, open-loop, each about one random camera, on up to
``--question-clients`` clients at once (one due while all are busy is counted as not sent). After ``--warmup-s``,
and then until every camera's lag is known and under 2 s (a backlog left by adding the cameras drains) or
``--settle-s`` has passed, it measures for ``--measure-s``: frames received, ingested and dropped per second, the
ingest backlog's trend, the lag of every camera (the wait of its oldest queued frame, read from /metrics once a
second), each frame's receipt-to-KV latency, time to first token and decode ms/token of the questions sent in the
window as the client sees them through gRPC (and as the server reports them), the worker's GPU memory (nvidia-smi),
and the CPU seconds per second of the router and of the worker's process tree, its decoding processes apart.

A step is real-time when every check of ``bench_service_step.StepResult.failures`` passes (lag, load short, falling
behind, questions; docs/gpu.md lists them); the ramp stops at the first step that is not (a larger N would not be
either; ``--keep-going`` measures the rest anyway, for tables of every N), and the report names the largest N that
was real-time with every smaller one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mosaic_core.config import BENCH_DEVICE_BUDGET_SHARE
from services import gil_probe, stack_probe
from services.bench_service_args import CLIP_ENV, PAUSE_SETTINGS, main_args
from services.bench_service_load import Load, push_delta
from services.bench_service_metrics import StreamSample, stream_samples
from services.bench_service_procs import cpu_seconds, gpu_memory_used_mib, tree_cpu, worker_gpu_memory_mib
from services.bench_service_report import describe, step_row, table, write
from services.bench_service_step import LAG_LIMIT_S, LOAD_EDGE_FRAMES_PER_CAMERA, StepResult
from services.bench_service_window import (
    Scrapes,
    camera_figures,
    cpu_figures,
    decode_cpu_estimate,
    engine_figures,
    gpu_figures,
    push_figures,
    question_figures,
)
from services.config import ServiceConfig
from services.local_service import LocalService, stop_services_on_sigterm

CREATE_CONCURRENCY = 4  # creates at once: the worker actor has about a dozen threads, which pushes need too
# After the window, questions sent in it get this long to finish before they count as unfinished (answers of 16
# tokens took under 2 s on the H200 at 150 cameras; a question still running after this is a failure of the step).
QUESTION_WAIT_S = 30.0
TELEMETRY_INTERVAL_S = 0.5  # the service's telemetry_interval_s (LocalService's): how stale the router's counters are


def measure_step(service: LocalService, load: Load, cameras: list[str], args, decode_cost_s: dict) -> StepResult:
    """Samples /metrics once a second for ``args.measure_s`` after the warm-up and the settling (``settle``); the
    window's figures are the changes between its first and last scrapes (lag: every scrape after the first), the
    pushers' counts between its ends, and the questions sent in it, once they finished (``QUESTION_WAIT_S`` at most).

    Lag and frame counts come from /metrics, which the router keeps from the workers' telemetry, rather than from
    ListStreams: that call asks the worker's engine thread once per stream, so under load it measures the engine's
    queue more than the cameras (it went UNAVAILABLE at 32 cameras on the H200).
    """
    time.sleep(args.warmup_s)
    ids = set(cameras)
    settled_after_s = settle(service, ids, args.settle_s)
    scrapes = Scrapes(ids)
    gil_before = gil_probe.read_latest(service.workdir, "worker-*")
    stacks_before = stack_probe.read_latest(service.workdir, "worker-*")
    worker_pid = service.worker_pid()
    scrapes.add(service.metrics_text(), time.monotonic())
    t0 = time.monotonic()
    pushes0, push_errors0 = load.push_counts()
    cpu0 = (cpu_seconds(service.server.pid), tree_cpu(worker_pid))
    gpu = _sample_each_second(service, scrapes, worker_pid, t0, args.measure_s)
    t1 = time.monotonic()
    elapsed = t1 - t0
    pushes1, push_errors1 = load.push_counts()
    cpu1 = (cpu_seconds(service.server.pid), tree_cpu(worker_pid))
    questions = load.window(t0, t1, wait_s=QUESTION_WAIT_S)
    pulled = sum(1 for c in cameras if c.startswith("pull-"))
    cams = camera_figures(scrapes, elapsed)
    pushes = push_delta(pushes0, pushes1)
    return StepResult(
        cameras=len(cameras),
        pulled=pulled,
        pushed=len(cameras) - pulled,
        measure_s=elapsed,
        offered_fps=args.fps * len(cameras),
        dropped=int(max(cams.pop("dropped_in_metrics"), sum(p.dropped for p in pushes))),  # counters are floats
        **cams,
        max_batch_frames=service_max_batch_frames(args),
        load_edge_frames=len(cameras) * (LOAD_EDGE_FRAMES_PER_CAMERA + args.fps * TELEMETRY_INTERVAL_S),
        **push_figures(pushes),
        push_errors=dict(push_errors1 - push_errors0),
        stats_errors=dict(scrapes.errors),
        **question_figures(questions, args.questions_per_s, elapsed),
        **gpu_figures(gpu),
        **cpu_figures(cpu0, cpu1, elapsed, pulled=pulled, decode_in_threads=args.decode_sources_in_threads),
        decode_cpu_estimate_per_s=decode_cpu_estimate(
            decode_cost_s, fps=args.fps, num_cameras=len(cameras), pulled=pulled
        ),
        **engine_figures(scrapes, elapsed),
        worker_gil=gil_probe.wait_share(gil_before, gil_probe.read_latest(service.workdir, "worker-*")),
        engine_stacks=stack_probe.busiest(stacks_before, stack_probe.read_latest(service.workdir, "worker-*")),
        settled_after_s=settled_after_s,
    )


def _sample_each_second(
    service: LocalService, scrapes: Scrapes, worker_pid: int | None, t0: float, measure_s: float
) -> list[tuple[float | None, str | None]]:
    """Adds a /metrics scrape to ``scrapes`` once a second until ``measure_s`` after ``t0``; returns the worker's GPU
    memory read after each (``worker_gpu_memory_mib``)."""
    gpu: list[tuple[float | None, str | None]] = []
    while time.monotonic() - t0 < measure_s:
        time.sleep(1.0)
        scrapes.add(service.metrics_text(), time.monotonic())
        worker_tree = tree_cpu(worker_pid)
        gpu.append(worker_gpu_memory_mib(worker_tree.pids if worker_tree else ()))
    return gpu


def service_max_batch_frames(args) -> int:
    """The service's max_batch_frames: --max-batch-frames on a GPU, ServiceConfig's default with --quick."""
    return ServiceConfig.model_fields["max_batch_frames"].default if args.quick else args.max_batch_frames


def run_settings(args) -> dict:
    """The settings every step's figures depend on, for the report's footer and JSON."""
    return {
        "fps": args.fps,
        "retention_s": args.retention_s,
        "max_new_tokens": args.max_new_tokens,
        "questions_per_s": args.questions_per_s,
        "question_clients": args.question_clients,
        "push_clients": args.push_clients,
        "max_batch_frames": service_max_batch_frames(args),
        "warmup_s": args.warmup_s,
        "settle_s": args.settle_s,
        "measure_s": args.measure_s,
        "question_wait_s": QUESTION_WAIT_S,
        "telemetry_interval_s": TELEMETRY_INTERVAL_S,
    }


def settle(service: LocalService, ids: set[str], limit_s: float) -> float | None:
    """Waits, reading /metrics once a second, until ``lags_settled``, for at most ``limit_s``; returns the seconds
    waited, or None when some lag stayed at or over ``LAG_LIMIT_S``, or unknown."""
    started = time.monotonic()
    while True:
        text = service.metrics_text()
        waited_s = time.monotonic() - started
        if text and lags_settled(stream_samples(text, ids), ids):
            return waited_s
        if waited_s >= limit_s:
            return None
        time.sleep(1.0)


def lags_settled(samples: dict[str, StreamSample], ids: set[str]) -> bool:
    """Every camera of ``ids`` has a lag series, under ``LAG_LIMIT_S`` (one without is unknown, not 0)."""
    lags = [samples[c].lag_s if c in samples else None for c in ids]
    return None not in lags and max(lags, default=0.0) < LAG_LIMIT_S


def clip_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get(CLIP_ENV):
        return os.environ[CLIP_ENV]
    from mosaic_core.model.video import sample_clip_path

    return sample_clip_path("bikes.mp4")


def prepare_frames(clip: str, fps: float, max_frames: int) -> tuple[list[bytes], dict]:
    """The clip's frames at ``fps`` as JPEGs, and what one decode costs here in CPU seconds: a pushed JPEG, and a
    sampled frame of the clip (which decodes every frame of the source between two samples)."""
    from mosaic_core.model.video import iter_video_frames
    from services.frames import decode_frame, encode_image
    from services.gen.mosaic.v1 import mosaic_pb2 as pb

    started = time.process_time()
    sampled = [f.rgb for f in iter_video_frames(clip, fps=fps)]
    video_s = (time.process_time() - started) / max(1, len(sampled))
    jpegs = [encode_image(rgb, "jpeg") for rgb in sampled[:max_frames]]
    started = time.process_time()
    for jpeg in jpegs:
        decode_frame(pb.Frame(stream_id="probe", timestamp_s=0.0, encoded=jpeg))
    jpeg_s = (time.process_time() - started) / len(jpegs)
    height, width = sampled[0].shape[:2]
    return jpegs, {"jpeg_s": jpeg_s, "video_s": video_s, "frame_px": f"{width}x{height}"}


def service_overrides(args, clip: str) -> dict:
    """ServiceConfig fields over LocalService's defaults: the tiny preset on the CPU, or the model on one GPU."""
    common = {
        "source_roots": [str(Path(clip).resolve().parent)],
        "ingest_headroom": args.ingest_headroom,
        "redis_namespace": "bench",
        "telemetry_interval_s": TELEMETRY_INTERVAL_S,
        "host": args.host,
        "max_stream_labels": max(args.cameras) + 8,  # every camera gets its own series in /metrics
        **{name: getattr(args, name) for name in PAUSE_SETTINGS},
        "ingest_pause_skip_idle": args.ingest_pause_skip_idle,
        "vision_attention": args.vision_attention,
        "questions_alongside_ingest": args.questions_alongside_ingest,
        **({} if args.encode_ahead is None else {"encode_ahead": args.encode_ahead}),
        "python_switch_interval_s": args.switch_interval_ms / 1e3,
        "freeze_heap_after_start": not args.no_heap_freeze,
        "decode_sources_in_processes": not args.decode_sources_in_threads,
        "decode_oversample": args.decode_oversample,
        "ray_log_to_driver": args.serve_log_level == "DEBUG",
    }
    if args.quick:
        return {**common, "device_budget_bytes": 16 * 2**20, "host_budget_bytes": 64 * 2**20}
    return {
        **common,
        "model": args.model,
        "worker_gpus": 1.0,
        "ray_num_cpus": max(2, min(8, os.cpu_count() or 2)),
        # A fixed budget, or one sized from the GPU memory free once the model is loaded, as scenario B sizes it
        **(
            {"device_budget_share": BENCH_DEVICE_BUDGET_SHARE}
            if args.device_budget_gib is None
            else {"device_budget_bytes": int(args.device_budget_gib * 2**30)}
        ),
        "host_budget_bytes": int(args.host_budget_gib * 2**30),
        "max_push_calls": max(64, 2 * args.push_clients),
        "max_batch_frames": args.max_batch_frames,
        "engine": {
            "target_tokens_per_frame": args.tokens_per_frame,
            "local_window_tokens": args.window_tokens,
            "retrieval_budget_tokens": 4096,
            "durable_writers": args.durable_writers,
            # pinned once at start-up, so spilling a cluster to the host never pins memory on the ingest path
            "pinned_host_bytes": int(args.pinned_host_gib * 2**30),
            **({} if args.tower_stream is None else {"tower_stream": args.tower_stream}),
        },
    }


def add_cameras(client, load: Load, target: int, share: float, clip: str, args) -> list[str]:
    """Creates cameras until there are ``target``, keeping the pulled ones at ``share`` of all, a few at a time:
    each create waits for the worker's engine thread to finish its ingest call, so one after another 160 cameras
    took over 100 s on the H200 (16 at a time passed the 30-s deadline there while the router still created one
    stream at a time; bench/NOTES.md, session 15)."""
    new, pulled = [], sum(1 for c in load.cameras if c.startswith("pull-"))
    for n in range(len(load.cameras), target):
        pull = pulled < round(share * (n + 1))
        pulled += pull
        new.append(f"pull-{n:03d}" if pull else f"push-{n:03d}")

    def create(stream_id: str) -> None:
        if stream_id.startswith("pull-"):
            client.create_stream(stream_id, fps=args.fps, source_url=str(Path(clip).resolve()), loop_source=True,
                                 retention_s=args.retention_s)  # fmt: skip
        else:
            client.create_stream(stream_id, fps=args.fps, retention_s=args.retention_s)
            load.pushed.append(stream_id)

    with ThreadPoolExecutor(max_workers=CREATE_CONCURRENCY) as pool:
        list(pool.map(create, new))  # raises the first failure
    load.cameras.extend(new)
    return list(load.cameras)


def run_ramp(workdir: Path, args, on_step=None, data_dir: Path | None = None) -> dict:
    """Starts the service, ramps the cameras, and returns the whole report (settings, costs, steps); ``on_step``
    gets the report so far after every step, so a run cut short still leaves what it measured. The durable history
    goes under ``data_dir`` (default: ``workdir``'s)."""
    clip = clip_path(args.clip)
    _status(f"encoding the clip's frames as JPEG and timing decodes ({clip})")
    jpegs, decode_cost = prepare_frames(clip, args.fps, max_frames=16)
    overrides = service_overrides(args, clip)
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    service = LocalService(workdir, log_level=args.serve_log_level, **overrides)
    steps: list[StepResult] = []
    load, start_s, log_tail = None, None, None

    def report() -> dict:
        passing = list(itertools.takewhile(lambda s: s.real_time, steps))  # with --keep-going, steps go on past one
        return {
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "service": overrides,
            "start_s": start_s,
            "decode_cost": decode_cost,
            "settings": run_settings(args),
            "steps": [step_row(s) for s in steps],
            "largest_real_time_cameras": max((s.cameras for s in passing), default=0),
            "serve_log_tail": log_tail,  # kept when a step fails: the service's folder is deleted afterwards
        }

    try:
        what = "tiny preset, one CPU worker" if args.quick else f"{args.model}, one GPU worker"
        _status(f"starting redis-server and mosaic serve ({what})")
        started = time.monotonic()
        service.start_redis()
        probes = [gil_probe.ENV_DIR] * args.gil_probe + [stack_probe.ENV_DIR] * args.stack_probe
        with _probes_on(probes, workdir):  # the service's processes inherit the settings
            service.start_server(timeout_s=args.start_timeout_s)
        start_s = time.monotonic() - started
        _status(f"serving after {start_s:.0f} s; GPU memory {gpu_memory_used_mib()} MiB")
        load = Load(service, jpegs, args.fps, args.questions_per_s, args.max_new_tokens, args.push_clients,
                    args.question_clients)  # fmt: skip
        load.start()
        with service.client() as client:
            for n in args.cameras:
                cameras = add_cameras(client, load, n, args.pulled_share, clip, args)
                _status(f"N={n}: {n - len(load.pushed)} pulled, {len(load.pushed)} pushed; measuring")
                step = measure_step(service, load, cameras, args, decode_cost)
                steps.append(step)
                _status(f"N={n}: {describe(step)}")
                if on_step is not None:
                    on_step(report())
                if not step.real_time:
                    log_tail = log_tail or service.log_tail(80)
                    if on_step is not None:
                        on_step(report())
                    if not args.keep_going:
                        break
    finally:
        if load is not None:
            load.stop()
        service.stop()
    return report()


@contextlib.contextmanager
def _probes_on(variables: list[str], directory: Path):
    """While starting the service: each of the probes' ``variables`` set to ``directory``."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: str(directory) for name in variables})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    args = main_args(argv)
    stop_services_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-bench-service-"))
    data_dir = None
    if args.data_dir is not None:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        data_dir = Path(tempfile.mkdtemp(prefix="mosaic-bench-service-data-", dir=args.data_dir))
    try:
        report = run_ramp(workdir, args, on_step=lambda so_far: write(so_far, args.out), data_dir=data_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(table(report))
    write(report, args.out)
    if args.out:
        _status(f"written {args.out}.json and {args.out}.txt")
    return 0


def _status(message: str) -> None:
    print(f"[bench service] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
