"""Side-by-side benchmark of full, token and cluster modes: one command, one run, one table (+ JSON).

    mosaic bench engine                   # GPU: qwen2.5-vl-7b shape, bf16, 60-minute stream
    mosaic bench engine --quick           # CPU: tiny preset, small sizes (CI runs this so it cannot rot)

(``python -m bench.bench`` in a checkout runs the same.)

Scenarios (see issue 4):
- A: one long stream (1 fps, 126 visual tokens per frame from the 196x504 clip, real sample-clip frames looped),
  one engine per variant on equal machinery (``mosaic_core/bench/scenario_a.py``): full, ReKV-style token, frame blocks,
  cluster, random clusters; distinct questions with ingest between them; time to first token p50/p95, decode
  ms/token, bytes and slabs per question (promotion and merges included), transfer rate against the PCIe peak
  measured in the same run, peak GPU memory, attention recall against an oracle top-k and against chance,
  planted-attention probes, hidden-state error and next-token KL against full.
- B: many cameras ingested with cross-stream batching under a device budget sized from the GPU's free memory (or
  ``--camera-budget-gib``), far below their total KV for long runs; aggregate
  ingest frames/s of pre-decoded frames (not a real-time camera count: that is the service benchmark's); then
  questions at random cameras between ingest passes.
- C: peak memory and time to first token at growing stream lengths (checkpoints of scenario A's ingest).

Timings on CUDA use events around the region after a warm-up question, and medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mosaic_core.bench.b_pauses import PauseVariant, QuestionAtPause, call_pauses
from mosaic_core.bench.scenario_a import QUESTIONS as A_QUESTIONS
from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import (
    BENCH_DEVICE_BUDGET_SHARE,
    GIB,
    MIB,
    EngineConfig,
    RetrievalMode,
    device_budget_from_free,
)
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.vision_attention import VISION_ATTENTION_BACKENDS
from mosaic_core.terminal import Progress

QUESTIONS = [
    "When did the cyclist pass the camera?",
    "What happened in the first minutes?",
    "Was there a person near the road?",
    "Summarise the last ten minutes.",
    "When did the car leave?",
]
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
CAMERA_SECONDS = 60  # scenario B's seconds of video per camera, unless --camera-seconds says
RECALL_QUESTIONS = 2  # scenario A's recall questions, unless --recall-questions says


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchSettings:
    model: str
    device: str
    dtype: torch.dtype
    minutes: float
    checkpoints_min: tuple[float, ...]
    tokens_per_frame: int
    window_tokens: int
    budget_tokens: int
    cluster_tokens: int
    device_budget_bytes: int
    num_questions: int
    recall_questions: int
    probes: int
    probe_span_frames: int
    decode_questions: int
    recall_decode_tokens: int
    max_new_tokens: int
    frames_per_pass: int
    cameras: int
    camera_seconds: int
    camera_window_tokens: int
    camera_device_budget_bytes: int
    page_tokens: int | None = None  # set from the clip's frames once the model is loaded

    @classmethod
    def from_args(cls, args) -> BenchSettings:
        if args.quick:
            return cls(
                model="tiny",
                device="cuda" if torch.cuda.is_available() else "cpu",
                dtype=torch.float32,
                minutes=1.0,
                checkpoints_min=(0.5, 1.0),
                tokens_per_frame=16,
                window_tokens=64,
                budget_tokens=128,
                cluster_tokens=64,
                device_budget_bytes=4 * MIB,
                num_questions=3,
                recall_questions=1 if args.recall_questions is None else args.recall_questions,
                probes=3,
                probe_span_frames=2,
                decode_questions=2,
                recall_decode_tokens=3,
                max_new_tokens=4,
                frames_per_pass=4,
                cameras=4,
                camera_seconds=8,
                camera_window_tokens=64,
                camera_device_budget_bytes=4 * MIB,
            )
        return cls(
            model=args.model,
            device="cuda",
            dtype=torch.bfloat16,
            minutes=args.minutes,
            checkpoints_min=tuple(m for m in (5.0, 15.0, 30.0, 60.0) if m <= args.minutes),
            tokens_per_frame=128,
            window_tokens=4096,
            budget_tokens=args.budget_tokens,
            cluster_tokens=2048,
            device_budget_bytes=int(args.device_budget_gib * GIB),
            num_questions=args.questions,
            recall_questions=RECALL_QUESTIONS if args.recall_questions is None else args.recall_questions,
            probes=6,
            probe_span_frames=4,
            decode_questions=5,
            recall_decode_tokens=6,
            max_new_tokens=8,
            frames_per_pass=16,
            cameras=args.cameras,
            camera_seconds=args.camera_seconds,
            camera_window_tokens=512,
            camera_device_budget_bytes=4 * GIB,
        )


def settings_for(
    *,
    quick: bool,
    model: str,
    minutes: float,
    questions: int,
    budget_tokens: int,
    device_budget_gib: float,
    cameras: int = 1,
    camera_seconds: int = CAMERA_SECONDS,
    recall_questions: int | None = None,
) -> BenchSettings:
    """``BenchSettings`` for the other benches (profile, decode), which take only some of this one's flags."""
    return BenchSettings.from_args(argparse.Namespace(**locals()))


class Timer:
    """Wall time on CPU; CUDA events on GPU (synchronised before reading)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def measure_pcie_peak(device: str) -> float:
    """Pinned host->device bandwidth in GB/s (median of 20 copies of 256 MiB); 0 without CUDA."""
    if not device.startswith("cuda"):
        return 0.0
    src = torch.empty(256 * MIB, dtype=torch.uint8, pin_memory=True).random_()
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(25):
        with Timer(device) as t:
            dst.copy_(src, non_blocking=True)
        times.append(t.seconds)
    return src.numel() / statistics.median(times[5:]) / 1e9


def looped_frames(seconds: int, *, stream_id: str, clip: str, start_s: float = 0.0):
    """Real sample-clip frames at 1 fps, looped, as engine inputs: what ``iter_video_frames(loop=True)`` gives.

    Decoded once per clip and length in a process. A clip whose 1-fps frames fall on whole seconds and that lasts
    a whole number of them (bikes.mp4: 10 s) repeats exactly, so one pass is decoded and replayed: an hour of one
    camera is then 10 decoded frames, not 360 loops. Other clips are decoded loop by loop.
    """
    return [FrameInput(stream_id, start_s + t, rgb) for t, rgb in _decoded(clip, seconds)]


@functools.lru_cache(maxsize=8)
def _decoded(clip: str, seconds: int) -> list[tuple[float, np.ndarray]]:
    from mosaic_core.model.video import iter_video_frames, probe_video, sample_clip_path

    path = sample_clip_path(clip)
    one_pass = list(iter_video_frames(path, fps=1.0))
    on_whole_seconds = [f.timestamp_s for f in one_pass] == list(range(len(one_pass)))
    if on_whole_seconds and probe_video(path).duration_s == len(one_pass):
        return [(float(i), one_pass[i % len(one_pass)].rgb) for i in range(seconds)]
    return [(f.timestamp_s, f.rgb) for f in iter_video_frames(path, fps=1.0, loop=True, max_frames=seconds)]


def sized_to_machine(s: BenchSettings, model, camera_budget_gib: float | None, log) -> BenchSettings:
    """Pages the size of scenario A's frames, and scenario B's device budget from the GPU's free memory."""
    frame = looped_frames(1, stream_id="probe", clip=CLIPS[0])[0].rgb
    page_tokens = model.choose_geometry(*frame.shape[:2], s.tokens_per_frame).tokens_per_frame
    budget = s.camera_device_budget_bytes
    if camera_budget_gib is not None:
        budget = int(camera_budget_gib * GIB)
    elif s.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        budget = device_budget_from_free(free, share=BENCH_DEVICE_BUDGET_SHARE, floor_bytes=budget)
    log(f"pages of {page_tokens} tokens (one frame); scenario B device budget {budget / GIB:.1f} GiB")
    return dataclasses.replace(s, page_tokens=page_tokens, camera_device_budget_bytes=budget)


def engine_config(s: BenchSettings, mode: RetrievalMode | str) -> EngineConfig:
    return EngineConfig(
        mode=mode,
        target_tokens_per_frame=s.tokens_per_frame,
        page_tokens=s.page_tokens,
        local_window_tokens=s.window_tokens,
        retrieval_budget_tokens=s.budget_tokens,
        device_budget_bytes=s.device_budget_bytes,
        host_budget_bytes=512 * GIB,
        max_frames_per_pass=s.frames_per_pass,
        max_new_tokens_limit=max(64, s.max_new_tokens),
        formation=FormationConfig(max_tokens=s.cluster_tokens),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scenario_a(model, s: BenchSettings, pcie_gbs: float, log, save=None, variants=None) -> tuple[dict, dict]:
    """Long stream, one engine per variant (``scenario_a``), with scaling checkpoints (scenario C)."""
    from mosaic_core.bench import scenario_a as equal_machinery

    frames = looped_frames(int(s.minutes * 60), stream_id="cam", clip=CLIPS[0])
    bare_ms = bare_question_ms(model, s)
    log(f"A: question forward without retrieval {bare_ms:.1f} ms")
    return equal_machinery.run(
        model, s, frames, pcie_gbs, bare_ms, log, engine_config=engine_config, pinned_bytes=pinned_bytes, save=save,
        variants=variants,
    )  # fmt: skip


def pinned_bytes(history_bytes: int, s: BenchSettings) -> int:
    """Host memory to pin up front for a run that keeps ``history_bytes`` of KV (token mode keeps it all on the
    host), plus slack for the ranges of growing clusters."""
    return int(history_bytes * 1.1) if s.device.startswith("cuda") else 0


def bare_question_ms(model, s: BenchSettings) -> float:
    """Time to first token of a question on a stream with no history: the floor's forward term."""
    engine = Engine(model, engine_config(s, RetrievalMode.CLUSTER))
    engine.open_stream("bare")
    engine.answer("bare", QUESTIONS[0], max_new_tokens=1)
    times = [engine.answer("bare", q, max_new_tokens=1).timings.time_to_first_token_s for q in QUESTIONS]
    return statistics.median(times) * 1e3


def profile_ingest(engine: Engine, batches: list[list[FrameInput]], path: Path, cameras: list[str]) -> None:
    """torch.profiler over a few ingest calls (where an ingest pass spends host and device time), then over the
    same calls each followed by a question to one of ``cameras``, as scenario B's second half runs them, with
    ``bench.ingest`` and ``bench.question`` ranges."""
    from torch.profiler import ProfilerActivity, profile, record_function

    # after everything the cameras sent so far
    shifted = [[dataclasses.replace(f, timestamp_s=10_000.0 + k) for f in batch] for k, batch in enumerate(batches)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in shifted:
            engine.ingest(batch)
        torch.cuda.synchronize()
    later = [[dataclasses.replace(f, timestamp_s=f.timestamp_s + len(batches)) for f in batch] for batch in shifted]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as asked:
        for batch, camera in zip(later, cameras, strict=False):
            with record_function("bench.ingest"):
                engine.ingest(batch)
            with record_function("bench.question"):
                engine.answer(camera, QUESTIONS[0], max_new_tokens=2)
        torch.cuda.synchronize()

    def tables(run) -> list[str]:
        averages = run.key_averages()
        return [averages.table(sort_by=key, row_limit=30) for key in ("self_cpu_time_total", "self_cuda_time_total")]

    text = ["# ingest passes", *tables(prof)]
    text += [f"# the same passes, each followed by a question ({len(later)} of each)", *tables(asked)]
    path.write_text("\n\n".join(text))


def scenario_b(
    model,
    s: BenchSettings,
    log,
    profile_to: Path | None = None,
    modes: tuple[RetrievalMode, ...] = (RetrievalMode.TOKEN, RetrievalMode.CLUSTER),
    data_dir: str | None = None,
    durable_writers: int = EngineConfig.durable_writers,
    durable_pending_bytes: int = EngineConfig.durable_pending_bytes,
    keyframes_per_cluster: int = EngineConfig.keyframes_per_cluster,
    pause_variants: tuple[PauseVariant, ...] = (PauseVariant(),),
    name_cameras: bool = False,
    tower_streams: tuple[bool, ...] = (False,),
) -> dict:
    """Many cameras, batched ingest under a small device budget, then questions while ingest continues. With
    ``data_dir`` the cameras' history is written durably under it (a folder per mode), as a service worker does. Each
    mode runs once per pause variant and ``EngineConfig.tower_stream`` setting, on an engine of its own: with pauses,
    the ingest calls pause as the service's do, and questions start at a pause (``mosaic_core.bench.b_pauses``).
    With several variants a row is named by mode and variant, a row with the tower on its own stream ends in
    "tower-stream", and with ``name_cameras`` a row is named by its number of cameras too.

    Each row keeps a digest of what its ingest-only passes stored (clusters opened, and each cluster's
    ``SummaryIndex.checksums``); a tower-stream row whose plain twin ran before it records whether the two agree,
    since both ingest the same frames."""
    per_camera = [
        looped_frames(s.camera_seconds, stream_id=f"cam{c:03d}", clip=CLIPS[c % len(CLIPS)], start_s=0.0)
        for c in range(s.cameras)
    ]
    results, digests = {}, {}
    for mode, variant, tower_stream in itertools.product(modes, pause_variants, tower_streams):
        row = mode.value if len(pause_variants) == 1 else f"{mode.value} {variant.name}"
        row = f"{row} tower-stream" if tower_stream else row
        row = f"{row} {s.cameras} cameras" if name_cameras else row
        # A small window per camera keeps 32 windows well inside a device budget far below the cameras' KV.
        config = dataclasses.replace(
            engine_config(s, mode),
            max_frames_per_pass=1,
            local_window_tokens=s.camera_window_tokens,
            device_budget_bytes=s.camera_device_budget_bytes,
            # 32 open clusters of 8 frames fit next to 32 windows in the budget, so cameras grow their clusters
            # on the device and spill them once sealed
            formation=FormationConfig(max_tokens=min(s.cluster_tokens, 8 * s.tokens_per_frame)),
            keyframes_per_cluster=keyframes_per_cluster,
            tower_stream=tower_stream,
        )
        history_bytes = s.cameras * s.camera_seconds * s.tokens_per_frame * model.kv_spec.bytes_per_token
        config = dataclasses.replace(config, pinned_host_bytes=pinned_bytes(history_bytes, s))
        if data_dir is not None:
            config = dataclasses.replace(
                config,
                data_dir=str(Path(data_dir) / row.replace(" ", "-")),
                durable_writers=durable_writers,
                durable_pending_bytes=durable_pending_bytes,
            )
        engine = Engine(model, config)
        retries_before = _alloc_retries()
        for c in range(s.cameras):
            engine.open_stream(f"cam{c:03d}")
        half = s.camera_seconds // 2
        engine.ingest([frames[0] for frames in per_camera])  # warm-up: the first pass compiles and allocates
        t0, t0_unix = time.perf_counter(), time.time()
        calls = []
        progress = Progress(f"B/{row}: passes", s.camera_seconds - 1)  # a line every 5 s, with an ETA
        for second in range(1, half):
            calls.append(engine.ingest([frames[second] for frames in per_camera], pauses=call_pauses(variant)))
            progress.update(second, "ingest only")
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        ingest_s = time.perf_counter() - t0
        ingest_only_unix_s = [t0_unix, time.time()]
        fps = s.cameras * (half - 1) / ingest_s
        cluster_ids = [c.cluster_id for n in range(s.cameras) for c in engine.clusters(f"cam{n:03d}")]
        digest = {
            "clusters_opened": sum(c.num_clusters_opened for c in calls),
            "key_sum_checksums": dict(
                zip(cluster_ids, engine.parts.tiering.summaries.checksums(cluster_ids), strict=True)
            ),
        }
        twin = digests.setdefault((mode, variant), digest) if not tower_stream else digests.get((mode, variant))

        rng = random.Random(0)
        ttfts, ttfts_device = [], []
        asked = None
        for second in range(half, s.camera_seconds):
            camera = f"cam{rng.randrange(s.cameras):03d}"
            asked = QuestionAtPause(engine, camera, rng.choice(QUESTIONS), max_new_tokens=2)
            engine.ingest(
                [frames[second] for frames in per_camera],
                pauses=call_pauses(variant, asked),
            )
            answer = asked.finish()
            ttfts.append(answer.timings.time_to_first_token_s)
            ttfts_device.append(answer.timings.first_token_device_s)
            progress.update(second, "ingest and questions")
        if profile_to is not None and mode is RetrievalMode.CLUSTER and variant == pause_variants[0]:
            batches = [[frames[k] for frames in per_camera] for k in range(3)]
            profile_ingest(engine, batches, profile_to, [f"cam{c:03d}" for c in range(3)])
        stats = engine.stats()
        durable = None if engine.history is None else engine.history.store.snapshot_stats()
        total_kv = sum(sum(engine.stream_stats(f"cam{c:03d}").bytes_by_tier.values()) for c in range(s.cameras))
        closing = time.perf_counter()
        engine.close()  # with a data directory: waits until every sealed cluster queued so far is on disk
        close_s = time.perf_counter() - closing
        results[row] = {
            "cameras": s.cameras,
            "total_kv_bytes": total_kv,
            "device_budget_bytes": config.device_budget_bytes,
            "ingest_frames_per_s": fps,
            "ingest_pass_ms": ingest_s / (half - 1) * 1e3,
            "real_time": ingest_s / (half - 1) <= 1.0,  # a pass of one frame per camera within a second of video
            "ingest_only_unix_s": ingest_only_unix_s,  # wall-clock span of the passes above (bench.sampled_engine)
            "vision_ms_per_pass": statistics.median(c.encode_s for c in calls) * 1e3,
            # the host's time in a pass (medians), by what it was doing: queuing the vision tower and the language
            # model, waiting for the device, placing frames into clusters (mosaic_core.engine.results.IngestResult)
            "host_ms_per_pass": {
                part: statistics.median(getattr(c, f"{part}_s") for c in calls) * 1e3
                for part in ("encode", "issue", "wait", "place")
            },
            "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
            "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
            # on the GPU's clock, from reaching the question to its first token (host stalls inside it included)
            "ttft_device_p50_ms": None if None in ttfts_device else percentile(ttfts_device, 0.5) * 1e3,
            "ttfts_ms": [round(t * 1e3, 1) for t in ttfts],  # in order: which questions were slow
            "hit_ratio": stats.device_hit_ratio,  # measured in every mode
            "device_bytes_used": stats.used_bytes_by_tier["device"],
            "host_bytes_used": stats.used_bytes_by_tier["host"],
            "durable": data_dir is not None,
            "keyframes_per_cluster": config.keyframes_per_cluster,
            "pauses": variant.name,  # off: questions asked after the ingest call
            "tower_stream": engine.parts.tower_stream is not None,  # what ran: on the CPU there is none
            "stored_digest": {"clusters_opened": digest["clusters_opened"], "clusters": len(cluster_ids)},
            # with the tower on its own stream: whether the same frames stored the same clusters and keys as without
            "stored_as_tower_off": None if not tower_stream or twin is None else _digests_agree(digest, twin),
            "close_s": close_s,
            # the caching allocator's: memory it holds, and retries after failed allocations (each frees its cache,
            # waiting for the whole device) while this row ran; None off CUDA
            "cuda_reserved_bytes": torch.cuda.memory_reserved() if torch.cuda.is_available() else None,
            "cuda_alloc_retries": None if retries_before is None else _alloc_retries() - retries_before,
            # captures block the engine thread: a question that captures waits for them
            "graph_captures": {
                pool.what: {"captured": pool.num_captured, "capture_s": pool.capture_s, "failure": pool.failure}
                for pool in (engine.parts.prefill_graphs.graph_pool, engine.parts.decode_graphs.graph_pool)
            },
        }
        if durable is not None:  # before closing: what held ingest back, and how busy the file writers were
            results[row]["durable_writes"] = {
                "writers": config.durable_writers,
                "pending_bytes_bound": config.durable_pending_bytes,
                "submit_wait_s": durable.submit_wait_s,
                "staging_wait_s": durable.staging_wait_s,
                "snapshot_s": engine.history.snapshot_s,  # the engine thread's, making the writers' snapshots
                "file_write_s": durable.file_write_s,
                "bytes_written": durable.bytes_written,
                "clusters_written": durable.clusters_written,
                "seal_to_durable_s_max": durable.seal_to_durable_s_max,
                "seconds_measured": time.perf_counter() - t0,
            }
        log(f"B/{row}: {json.dumps(results[row])}")
        del engine, asked  # a question's answer holds the engine: the next engine takes the device budget afresh
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _alloc_retries() -> int | None:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else None


def _digests_agree(digest: dict, twin: dict, rel_tol: float = 1e-4) -> bool:
    """The same clusters opened, under the same ids, and each cluster's key sums equal up to the float rounding of
    the summaries' indexed adds."""
    ours, theirs = digest["key_sum_checksums"], twin["key_sum_checksums"]
    return (
        digest["clusters_opened"] == twin["clusters_opened"]
        and ours.keys() == theirs.keys()
        and all(abs(ours[c] - theirs[c]) <= rel_tol * max(abs(theirs[c]), 1e-12) for c in theirs)
    )


def _variants(text: str, parser: argparse.ArgumentParser) -> set[str]:
    from mosaic_core.bench.scenario_a import VARIANTS

    chosen = {v.strip() for v in text.split(",") if v.strip()}
    if not chosen or chosen - set(VARIANTS):
        parser.error(f"--variants {text!r}: choose among {', '.join(VARIANTS)}")
    return chosen


def _b_modes(text: str, parser: argparse.ArgumentParser) -> tuple[RetrievalMode, ...]:
    allowed = {RetrievalMode.TOKEN.value, RetrievalMode.CLUSTER.value}
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    if not chosen or set(chosen) - allowed:
        parser.error(f"--b-modes {text!r}: choose among token, cluster")
    return tuple(RetrievalMode(m) for m in chosen)


def main_args(argv=None) -> argparse.Namespace:
    """The command line, checked whole before anything loads: a bad flag or value exits with argparse's usage error.
    Adds what the checks parse: ``tower_streams``, ``pause_variants``, ``camera_counts``, ``variant_names`` (None: all)
    and ``b_mode_list``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, small sizes; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument("--device-budget-gib", type=float, default=8.0)
    parser.add_argument(
        "--cameras", default="32",
        help="scenario B's cameras; comma-separated counts (32,64,128) run one after another on the model loaded once",
    )  # fmt: skip
    parser.add_argument(
        "--camera-seconds", type=int, default=CAMERA_SECONDS, help="scenario B's seconds of video per camera"
    )
    parser.add_argument("--scenarios", default="A,B", help="comma-separated: A (with C), B")
    parser.add_argument(
        "--recall-questions", type=int, default=None,
        help=f"scenario A's untimed questions that measure attention recall, the last N of its {len(A_QUESTIONS)} "
        f"(default {RECALL_QUESTIONS}; 1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--variants",
        default=None,
        help="scenario A's rows, comma-separated (default: full,rekv-token,frame,cluster,random)",
    )
    parser.add_argument(
        "--camera-budget-gib",
        type=float,
        default=None,
        help="scenario B's device budget; default: 80%% of the GPU memory free after loading the model, less 2 GiB",
    )
    parser.add_argument("--out", default="bench/out/results.json")
    parser.add_argument("--profile-ingest", action="store_true", help="write a torch.profiler table of B's ingest")
    parser.add_argument("--b-modes", default="token,cluster", help="scenario B's retrieval modes, comma-separated")
    parser.add_argument("--b-data-dir", default=None, help="scenario B writes its history durably under this folder")
    parser.add_argument(
        "--durable-writers", type=int, default=EngineConfig.durable_writers,
        help="threads writing record files under --b-data-dir",
    )  # fmt: skip
    parser.add_argument(
        "--durable-pending-gib", type=float, default=EngineConfig.durable_pending_bytes / GIB,
        help="snapshots that may wait for those writers before ingest waits (GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--b-keyframes", type=int, default=EngineConfig.keyframes_per_cluster,
        help="scenario B's JPEG keyframes kept per cluster (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--vision-attention", choices=sorted(VISION_ATTENTION_BACKENDS), default="varlen",
        help="the vision tower's attention kernel on CUDA, as the service's vision_attention (its default: varlen)",
    )  # fmt: skip
    parser.add_argument(
        "--b-pauses", default="off",
        help="scenario B's pause variants, comma-separated, each run side by side: off, or every<L>[-ahead<K>]"
        "[-skip-idle] to pause every L layers as the service's ingest calls do (mosaic_core/bench/b_pauses.py)",
    )  # fmt: skip
    parser.add_argument(
        "--b-tower-stream", default="off",
        help="scenario B's EngineConfig.tower_stream settings, comma-separated (off, on), each run side by side: on "
        "queues each call's vision tower on a CUDA stream of its own",
    )  # fmt: skip
    args = parser.parse_args(argv)
    switches = {"off": False, "on": True}
    tower_streams = tuple(dict.fromkeys(switches.get(v.strip()) for v in args.b_tower_stream.split(",")))
    if None in tower_streams:
        parser.error(f"--b-tower-stream {args.b_tower_stream!r}: choose off, on or off,on")
    try:
        pause_variants = tuple(dict.fromkeys(PauseVariant.parse(v.strip()) for v in args.b_pauses.split(",")))
    except ValueError as err:
        parser.error(f"--b-pauses: {err}")
    if args.recall_questions is not None and not 0 <= args.recall_questions <= len(A_QUESTIONS):
        parser.error(f"--recall-questions {args.recall_questions}: choose 0 to {len(A_QUESTIONS)}")
    if not 0 <= args.b_keyframes <= 16:
        parser.error(f"--b-keyframes {args.b_keyframes}: choose 0 to 16 keyframes per cluster")
    try:
        camera_counts = tuple(dict.fromkeys(int(n) for n in args.cameras.split(",")))
    except ValueError:
        camera_counts = ()
    if not camera_counts or min(camera_counts) < 1:
        parser.error(f"--cameras {args.cameras!r}: give one or more counts of cameras, comma-separated, each >= 1")
    args.tower_streams, args.pause_variants, args.camera_counts = tower_streams, pause_variants, camera_counts
    args.variant_names = None if args.variants is None else _variants(args.variants, parser)
    args.b_mode_list = _b_modes(args.b_modes, parser)
    return args


def main(argv=None) -> int:
    args = main_args(argv)
    camera_counts = args.camera_counts
    s = BenchSettings.from_args(argparse.Namespace(**{**vars(args), "cameras": camera_counts[0]}))
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {s.model} on {s.device} ({s.dtype})")
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype, vision_attention=args.vision_attention)
    log(f"the vision tower's attention: {args.vision_attention}")
    s = sized_to_machine(s, model, args.camera_budget_gib, log)
    pcie = measure_pcie_peak(s.device)
    log(f"pinned host->device peak: {pcie:.1f} GB/s")
    report = {"settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}, "pcie_gbs": pcie}
    report["vision_attention"] = args.vision_attention
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    scenarios = set(args.scenarios.upper().split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "A" in scenarios:
        report["budget_tokens"] = s.budget_tokens

        def save(rows, scaling):  # after each variant, so a run cut short keeps what it measured
            report["A"], report["C"] = rows, scaling
            out.write_text(json.dumps(report, indent=2))

        report["A"], report["C"] = scenario_a(model, s, pcie, log, save=save, variants=args.variant_names)
    if "B" in scenarios:
        # with several counts of cameras, one profile each: FILE.ingest-profile.N.txt
        profile_to = Path(args.out).with_suffix(".ingest-profile.txt") if args.profile_ingest else None
        profile_to = profile_to if s.device.startswith("cuda") else None
        report["B"] = {}
        several = len(camera_counts) > 1
        for cameras in camera_counts if several else (s.cameras,):  # --quick: its own count
            report["B"] |= scenario_b(
                model,
                dataclasses.replace(s, cameras=cameras),
                log,
                profile_to.with_suffix(f".{cameras}.txt") if profile_to and several else profile_to,
                args.b_mode_list,
                data_dir=args.b_data_dir,
                durable_writers=args.durable_writers,
                durable_pending_bytes=int(args.durable_pending_gib * GIB),
                keyframes_per_cluster=args.b_keyframes,
                pause_variants=args.pause_variants,
                name_cameras=several,
                tower_streams=args.tower_streams,
            )
            out.write_text(json.dumps(report, indent=2))  # after each count, so a run cut short keeps what it measured
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    from mosaic_core.bench.report import format_report

    print(format_report(report))
    print(f"\nraw results (JSON): {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
