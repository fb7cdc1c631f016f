"""``mosaic bench soak``: a real local service run for hours, sampled, and its slopes after warm-up.

Starts ``redis-server`` and ``mosaic serve`` (tiny preset and one CPU worker unless ``--model`` and ``--gpu`` say
otherwise, a data directory, retention on) as child processes, pushes N looping cameras at real-time pace and asks a
question at a steady rate. Every ``--sample-s`` it records, per process, resident memory (router and worker, from
``/proc``), and from the service: tier bytes, clusters, the worst stream lag, frames dropped, and the time to first
token of the questions asked since the previous sample (measured by the client), and how much of each second the
worker's engine thread spent on the upkeep after its ingest calls (the metadata flush, retention, watch checks) and on
other work (commands, the publisher's checks), which must stay flat however long the history. With ``--heap`` the router
and worker also trace their Python heap (``services.heap_probe``: bytes tracemalloc holds, objects the garbage collector
tracks, and the source lines that grew most), sampled alongside. At the end it fits a line to each series after
``--warmup-s`` and prints the slopes per hour, with a small plot of the worker's memory. A flat service has slopes near
zero; the issue's targets are a worker RSS slope under 10 MB/h, TTFT p99 drift under 10%/h and a flat lag p99.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services import heap_probe
from services.bench_service_report import without_local_paths
from services.local_service import LocalService, stop_services_on_sigterm

QUESTIONS = ("what happened?", "was anyone there?", "what moved last?", "describe the scene")


@dataclass(slots=True)
class Sample:
    t_s: float
    router_rss_mb: float
    worker_rss_mb: float
    tier_bytes_mb: float
    clusters: float
    lag_max_s: float
    dropped: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    worker_heap_mb: float | None = None
    worker_objects: float | None = None
    router_heap_mb: float | None = None
    upkeep_ms_per_s: float | None = None  # the engine thread's ``ingest_upkeep`` since the previous sample
    other_ms_per_s: float | None = None  # its ``other`` (commands, stats) since the previous sample
    engine_parts_s: dict[str, float] = field(default_factory=dict)  # the parts' totals so far


@dataclass(slots=True)
class Load:
    """Cameras and questions driven from background threads; question latencies and errors collected."""

    service: LocalService
    frames: list
    cameras: int
    fps: float
    questions_per_min: float
    ttfts_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for target in (self._push, self._ask):
            threading.Thread(target=target, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def take_ttfts(self) -> list[float]:
        with self._lock:
            taken, self.ttfts_ms = self.ttfts_ms, []
        return taken

    def _error(self, err) -> None:
        with self._lock:
            self.errors[err.code().name] = self.errors.get(err.code().name, 0) + 1

    def _push(self) -> None:
        import grpc

        index, start = 0, time.monotonic()
        with self.service.client() as client:
            # Frame k is due at start + k/fps and carries that time: the stream clock stays on the wall clock
            # however long a push takes (frames due while a push ran are skipped, as a live camera's would be).
            while not self._stop.wait(max(0.0, start + (index + 1) / self.fps - time.monotonic())):
                index = max(index + 1, int((time.monotonic() - start) * self.fps))
                clock_s = index / self.fps
                rgb = self.frames[index % len(self.frames)]
                try:
                    client.push_frames([(f"soak-{c}", clock_s, rgb) for c in range(self.cameras)], timeout_s=30)
                except grpc.RpcError as err:
                    self._error(err)

    def _ask(self) -> None:
        import grpc

        interval_s, n = 60.0 / self.questions_per_min, 0
        with self.service.client() as client:
            while not self._stop.wait(interval_s):
                n += 1
                try:
                    result = client.ask(QUESTIONS[n % len(QUESTIONS)], [f"soak-{n % self.cameras}"], max_new_tokens=4,
                                        timeout_s=60)  # fmt: skip
                except grpc.RpcError as err:
                    self._error(err)
                    continue
                if result.timings is not None:
                    with self._lock:
                        self.ttfts_ms.append(1e3 * result.timings.time_to_first_token_s)


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def metric_sum(text: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    return sum(values)


def metric_max(text: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    return max(values, default=0.0)


def engine_part_totals(text: str) -> dict[str, float]:
    """Seconds of the workers' engine threads by part, summed over workers."""
    totals: dict[str, float] = {}
    for part, value in re.findall(r'^mosaic_engine_loop_seconds_total\{[^}]*part="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        totals[part] = totals.get(part, 0.0) + float(value)
    return totals


def per_second_ms(now: dict[str, float], before: dict[str, float], part: str, elapsed_s: float) -> float | None:
    if part not in now or part not in before or elapsed_s <= 0:
        return None
    return 1e3 * (now[part] - before[part]) / elapsed_s


def sample(service: LocalService, load: Load, t_s: float, previous: Sample | None = None) -> Sample:
    text = service.metrics_text()
    parts = engine_part_totals(text)
    before, elapsed_s = (previous.engine_parts_s, t_s - previous.t_s) if previous is not None else ({}, 0.0)
    ttfts = load.take_ttfts()
    worker_heap = heap_probe.read_latest(service.workdir, "worker-*")
    router_heap = heap_probe.read_latest(service.workdir, "router")
    return Sample(
        t_s=t_s,
        router_rss_mb=rss_mb(service.server.pid if service.server else None),
        worker_rss_mb=rss_mb(service.worker_pid()),
        tier_bytes_mb=metric_sum(text, "mosaic_tier_used_bytes") / 2**20,
        clusters=metric_sum(text, "mosaic_clusters"),
        lag_max_s=metric_max(text, "mosaic_stream_lag_seconds"),
        dropped=metric_sum(text, "mosaic_frames_dropped_total"),
        ttft_p50_ms=float(np.percentile(ttfts, 50)) if ttfts else None,
        ttft_p99_ms=float(np.percentile(ttfts, 99)) if ttfts else None,
        worker_heap_mb=None if worker_heap is None else worker_heap["traced_bytes"] / 2**20,
        worker_objects=None if worker_heap is None else worker_heap["objects"],
        router_heap_mb=None if router_heap is None else router_heap["traced_bytes"] / 2**20,
        upkeep_ms_per_s=per_second_ms(parts, before, "ingest_upkeep", elapsed_s),
        other_ms_per_s=per_second_ms(parts, before, "other", elapsed_s),
        engine_parts_s=parts,
    )


def slope_per_hour(samples: list[Sample], key: str, warmup_s: float) -> float | None:
    points = [(s.t_s, getattr(s, key)) for s in samples if s.t_s >= warmup_s and getattr(s, key) is not None]
    points = [(t, v) for t, v in points if np.isfinite(v)]
    if len(points) < 3:
        return None
    t, v = np.array(points).T
    return float(np.polyfit(t / 3600.0, v, 1)[0])


def sparkline(values: list[float], width: int = 60) -> str:
    ticks = "▁▂▃▄▅▆▇█"
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(ticks[int((v - low) / span * (len(ticks) - 1))] for v in values) + f"  {low:.0f}..{high:.0f}"


SERIES = (
    ("worker_rss_mb", "worker RSS", "MB/h"),
    ("router_rss_mb", "router RSS", "MB/h"),
    ("worker_heap_mb", "worker heap", "MB/h"),
    ("worker_objects", "worker objects", "/h"),
    ("router_heap_mb", "router heap", "MB/h"),
    ("tier_bytes_mb", "KV in tiers", "MB/h"),
    ("clusters", "clusters", "/h"),
    ("lag_max_s", "worst lag", "s/h"),
    ("dropped", "frames dropped", "/h"),
    ("ttft_p50_ms", "TTFT p50", "ms/h"),
    ("ttft_p99_ms", "TTFT p99", "ms/h"),
    ("upkeep_ms_per_s", "engine upkeep", "ms/s per h"),
    ("other_ms_per_s", "engine other", "ms/s per h"),
)


def report(samples: list[Sample], warmup_s: float) -> str:
    lines = [f"{'series':<16} {'first':>10} {'last':>10} {'slope after warm-up':>22}"]
    after = [s for s in samples if s.t_s >= warmup_s] or samples
    for key, name, unit in SERIES:
        first = next((getattr(s, key) for s in after if getattr(s, key) is not None), None)
        last = next((getattr(s, key) for s in reversed(after) if getattr(s, key) is not None), None)
        slope = slope_per_hour(samples, key, warmup_s)
        if first is None and last is None:
            continue  # a series not sampled in this run (the heap without --heap)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"{name:<16} {fmt(first):>10} {fmt(last):>10} {fmt(slope) + ' ' + unit:>22}")
    lines.append("worker RSS  " + sparkline([s.worker_rss_mb for s in samples]))
    return "\n".join(lines)


def run_soak(workdir: Path, args) -> tuple[list[Sample], dict[str, int], list | None]:
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    clip = args.clip or os.environ.get("MOSAIC_BENCH_CLIP") or sample_clip_path("bikes.mp4")
    frames = [f.rgb for f in iter_video_frames(clip, fps=args.fps, max_frames=40)]
    service = LocalService(
        workdir,
        model=args.model,
        worker_gpus=1.0 if args.gpu else 0.0,
        device_budget_bytes=args.device_budget_mib * 2**20,
        host_budget_bytes=args.host_budget_mib * 2**20,
        host=args.host,
    )
    samples: list[Sample] = []
    heap_env = {  # the service's processes inherit the environment and write their heap lines into workdir
        heap_probe.ENV_DIR: str(workdir),
        heap_probe.ENV_INTERVAL: str(min(args.sample_s, 30.0)),
        heap_probe.ENV_BASELINE: str(args.warmup_s),
    }
    saved_env = {name: os.environ.get(name) for name in heap_env}
    if args.heap:
        os.environ.update(heap_env)
    try:
        _status(f"starting redis-server and mosaic serve ({args.model}, one {'GPU' if args.gpu else 'CPU'} worker)")
        service.start_redis()
        service.start_server()
        with service.client() as client:
            for c in range(args.cameras):
                client.create_stream(f"soak-{c}", fps=args.fps, retention_s=args.retention_s)
        load = Load(service, frames, args.cameras, args.fps, args.questions_per_min)
        load.start()
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.duration_s:
            time.sleep(min(args.sample_s, max(0.0, args.duration_s - elapsed)))
            samples.append(sample(service, load, time.monotonic() - start, samples[-1] if samples else None))
            last = samples[-1]
            _status(
                f"{last.t_s / 60:5.1f}/{args.duration_s / 60:.0f} min: worker {last.worker_rss_mb:.0f} MB, "
                f"router {last.router_rss_mb:.0f} MB, {last.clusters:.0f} clusters, lag {last.lag_max_s:.1f} s"
            )
        load.stop()
        worker_heap = heap_probe.read_latest(workdir, "worker-*")
        return samples, dict(load.errors), None if worker_heap is None else worker_heap["growth"]
    finally:
        service.stop()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r} is not like 90s, 30m or 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosaic bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_duration, default="2h", dest="duration_s", help="e.g. 30m, 2h")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--questions-per-min", type=float, default=4.0)
    parser.add_argument("--retention-s", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=None, help="default: a fifth of the duration")
    parser.add_argument("--quick", action="store_true", help="3 minutes, sampled every 10 s (CPU, CI)")
    parser.add_argument("--json", default=None, help="also write every sample to this JSON file")
    parser.add_argument("--model", default="tiny", help="preset or checkpoint of the worker (default tiny)")
    parser.add_argument("--gpu", action="store_true", help="the worker takes one GPU")
    parser.add_argument("--host", default="127.0.0.1", help="address mosaic serve binds (0.0.0.0: Ray unbound)")
    parser.add_argument("--device-budget-mib", type=int, default=16, help="device KV budget of the worker")
    parser.add_argument("--host-budget-mib", type=int, default=64, help="host KV budget of the worker")
    parser.add_argument("--clip", default=None, help="video to loop (default: $MOSAIC_BENCH_CLIP, else bikes.mp4)")
    parser.add_argument("--heap", action="store_true", help="trace the service's Python heap (tracemalloc; slower)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.sample_s = 180.0, 10.0
    if args.warmup_s is None:
        args.warmup_s = args.duration_s / 5
    warmup_s = args.warmup_s
    stop_services_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-soak-"))
    try:
        samples, errors, heap_growth = run_soak(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(samples, warmup_s))
    print(f"client errors: {errors or 'none'}")
    if heap_growth is not None:
        print("worker heap, source lines that grew most after the warm-up (bytes, blocks):")
        print("\n".join(f"  {size:>+12,} {count:>+8,}  {site}" for site, size, count in heap_growth))
    if args.json:
        samples_json = json.dumps(
            dict(args=vars(args), errors=errors, heap_growth=heap_growth, samples=[asdict(s) for s in samples])
        )
        Path(args.json).write_text(without_local_paths(samples_json))
        _status(f"samples written to {args.json}")
    return 0


def _status(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
