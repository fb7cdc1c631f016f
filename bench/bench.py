"""Side-by-side benchmark of full, token and cluster modes: one command, one run, one table (+ JSON).

    python -m bench.bench                 # GPU: qwen2.5-vl-7b shape, bf16, 60-minute stream
    python -m bench.bench --quick         # CPU: tiny preset, small sizes (CI runs this so it cannot rot)

Scenarios (see issue 4):
- A: one long stream (1 fps, about 128 visual tokens per frame, real sample-clip frames looped), then questions
  at a retrieval budget; time to first token p50/p95, decode ms/token, bytes and copies per question, effective
  host->device bandwidth against the PCIe peak measured at the start of the same run, peak GPU memory, and
  attention recall against an oracle top-k.
- B: many cameras ingested with cross-stream batching under a device budget far below their total KV; frames/s
  and the real-time factor; then questions at random cameras while ingest continues.
- C: peak memory and time to first token at growing stream lengths (checkpoints of scenario A's ingest).

Timings on CUDA use events around the region after a warm-up question, and medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from mosaic_core.bookkeeping.formation import FormationConfig
from mosaic_core.config import GIB, MIB, EngineConfig, RetrievalMode
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.video import iter_video_frames, sample_clip_path

QUESTIONS = [
    "When did the cyclist pass the camera?",
    "What happened in the first minutes?",
    "Was there a person near the road?",
    "Summarise the last ten minutes.",
    "When did the car leave?",
]
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")


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
    decode_questions: int
    recall_decode_tokens: int
    max_new_tokens: int
    frames_per_pass: int
    cameras: int
    camera_seconds: int
    camera_window_tokens: int
    camera_device_budget_bytes: int

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
                recall_questions=1,
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
            recall_questions=3,
            decode_questions=5,
            recall_decode_tokens=6,
            max_new_tokens=16,
            frames_per_pass=16,
            cameras=args.cameras,
            camera_seconds=60,
            camera_window_tokens=512,
            camera_device_budget_bytes=4 * GIB,
        )


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
    """Real sample-clip frames at 1 fps, looped, as engine inputs."""
    frames = iter_video_frames(sample_clip_path(clip), fps=1.0, loop=True, max_frames=seconds, start_offset_s=start_s)
    return [FrameInput(stream_id, f.timestamp_s, f.rgb) for f in frames]


def engine_config(s: BenchSettings, mode: RetrievalMode) -> EngineConfig:
    return EngineConfig(
        mode=mode,
        target_tokens_per_frame=s.tokens_per_frame,
        local_window_tokens=s.window_tokens,
        retrieval_budget_tokens=s.budget_tokens,
        device_budget_bytes=s.device_budget_bytes,
        host_budget_bytes=512 * GIB,
        max_frames_per_pass=s.frames_per_pass,
        max_new_tokens_limit=max(64, s.max_new_tokens),
        formation=FormationConfig(max_tokens=s.cluster_tokens),
    )


def ask_many(
    engine: Engine, s: BenchSettings, stream_id: str, questions: list[str], timer_device: str, *, profile=False
):
    rows = []
    for q in questions:
        with Timer(timer_device) as t:
            answer = engine.answer(stream_id, q, max_new_tokens=s.max_new_tokens, profile=profile)
        r, tm = answer.retrieval, answer.timings
        transfer_s = r.transfer_s
        rows.append(
            {
                "ttft_s": tm.time_to_first_token_s,
                "decode_s_per_token": tm.decode_s_per_token,
                "bytes": r.bytes_fetched,
                "copies": r.num_copies,
                "total_s": t.seconds,
                "hits": r.device_hits,
                "lookups": r.device_lookups,
                "transfer_s": transfer_s,
                "score_s": tm.score_s,
                "fetch_s": tm.fetch_s,
                "layers_scored": r.num_layers_scored,
            }
        )
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scenario_a(model, s: BenchSettings, pcie_gbs: float, log) -> tuple[dict, dict, dict]:
    """Long stream per mode, with scaling checkpoints (scenario C)."""
    total_s = int(s.minutes * 60)
    frames = looped_frames(total_s, stream_id="cam", clip=CLIPS[0])
    results, scaling, decode = {}, {}, {}
    bare_ms = bare_question_ms(model, s)
    log(f"A: question forward without retrieval {bare_ms:.1f} ms")
    history_bytes = total_s * s.tokens_per_frame * model.kv_spec.bytes_per_token
    for mode in RetrievalMode:
        config = engine_config(s, mode)
        if mode is not RetrievalMode.FULL:  # pin the host tier once, up front, as a deployment would
            config = dataclasses.replace(config, pinned_host_bytes=pinned_bytes(history_bytes, s))
        log(f"A/{mode.value}: pinning {config.pinned_host_bytes / GIB:.1f} GiB of host memory")
        engine = Engine(model, config)
        engine.open_stream("cam")
        done, ingest_s = 0, 0.0
        checkpoints = [int(m * 60) for m in s.checkpoints_min]
        for checkpoint in checkpoints:
            if s.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for i in range(done, checkpoint, 64):
                engine.ingest(frames[i : min(i + 64, checkpoint)])
                log(f"A/{mode.value}: ingested {min(i + 64, checkpoint)}/{total_s} frames")
            ingest_s += time.perf_counter() - t0
            done = checkpoint
            engine.answer("cam", QUESTIONS[0], max_new_tokens=2)  # warm-up
            rows = ask_many(engine, s, "cam", QUESTIONS[:2], s.device)
            peak = torch.cuda.max_memory_allocated() if s.device.startswith("cuda") else 0
            scaling.setdefault(mode.value, []).append(
                {
                    "minutes": checkpoint / 60,
                    "ttft_s": statistics.median(r["ttft_s"] for r in rows),
                    "peak_bytes": peak,
                }
            )
        ingest_fps = total_s / ingest_s
        configs = {mode.value: engine.config}
        if mode is RetrievalMode.CLUSTER:
            for label, layer in cluster_variants(s, engine.config.prefetch_after_layer):
                configs[label] = dataclasses.replace(engine.config, prefetch_after_layer=layer)
        for label, result in measure_questions(engine, s, configs, pcie_gbs, bare_ms, ingest_fps).items():
            results[label] = result
            log(f"A/{label}: {json.dumps(result)}")
        if mode is RetrievalMode.CLUSTER:
            decode = decode_rescoring(engine, s, log)
        del engine
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results, scaling, decode


def pinned_bytes(history_bytes: int, s: BenchSettings) -> int:
    """Host memory to pin up front for a run that keeps ``history_bytes`` of KV (token mode keeps it all on the
    host), plus slack for the ranges of growing clusters."""
    return int(history_bytes * 1.1) if s.device.startswith("cuda") else 0


def cluster_variants(s: BenchSettings, default_layer: int | None) -> list[tuple[str, int | None]]:
    """The same cluster-mode stream asked again with each way of choosing later layers' clusters."""
    layers = [None, 0, 1, 3] if s.model != "tiny" else [None, 0]
    return [(_variant_label(layer), layer) for layer in layers if layer != default_layer]


def _variant_label(layer: int | None) -> str:
    return "cluster/per-layer" if layer is None else f"cluster/prefetch@{layer}"


def measure_questions(
    engine: Engine, s: BenchSettings, configs: dict[str, EngineConfig], pcie_gbs: float, bare_ms: float, ingest_fps
) -> dict[str, dict]:
    """Asks the same questions under each config of one engine, round-robin with the order rotated per
    question, so drift over the run and the GPU cluster cache's warmth fall on every config alike."""
    labels = list(configs)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(s.num_questions)]
    rows: dict[str, list[dict]] = {label: [] for label in labels}
    profiled: dict[str, list[dict]] = {label: [] for label in labels}
    recalls: dict[str, list[float]] = {label: [] for label in labels}
    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i, question in enumerate(questions):
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
            engine.config = configs[label]
            rows[label] += ask_many(engine, s, "cam", [question], s.device)
            if i < 3:
                profiled[label] += ask_many(engine, s, "cam", [question], s.device, profile=True)
            if i < s.recall_questions:
                answer = engine.answer("cam", question, max_new_tokens=1, measure_recall=True)
                recalls[label].append(answer.retrieval.attention_recall)
    engine.config = configs[labels[0]]
    peak = torch.cuda.max_memory_allocated() if s.device.startswith("cuda") else 0
    return {label: _summary(configs[label], rows[label], profiled[label], recalls[label], peak) | {
        "ingest_frames_per_s": ingest_fps,
        "clusters": len(engine.clusters("cam")),
        "floor_ms": _floor_ms(rows[label], pcie_gbs, bare_ms),
    } for label in labels}  # fmt: skip


def _summary(config: EngineConfig, rows: list[dict], profiled: list[dict], recalls: list, peak: int) -> dict:
    ttfts = [r["ttft_s"] for r in rows]
    recalls = [x for x in recalls if x is not None]
    return {
        "prefetch_after_layer": config.prefetch_after_layer,
        "layers_scored": rows[0]["layers_scored"],
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1e3,
        "decode_ms_per_token": statistics.median(r["decode_s_per_token"] for r in rows) * 1e3,
        "bytes_per_question": statistics.mean(r["bytes"] for r in rows),
        "copies_per_question": statistics.mean(r["copies"] for r in rows),
        "peak_gpu_bytes": peak,  # of all configs asked on this engine together
        "recall": statistics.mean(recalls) if recalls else None,
        "first_question_bytes": rows[0]["bytes"],
        "first_question_ttft_ms": rows[0]["ttft_s"] * 1e3,
        "hit_ratio": sum(r["hits"] for r in rows) / max(1, sum(r["lookups"] for r in rows)),
        "effective_gbs": _effective_gbs(rows),
        "transfer_gbs": _transfer_gbs(rows),
        "score_ms": statistics.median(r["score_s"] for r in profiled) * 1e3,
        "fetch_ms": statistics.median(r["fetch_s"] for r in profiled) * 1e3,
        "profiled_ttft_ms": statistics.median(r["ttft_s"] for r in profiled) * 1e3,
    }


def _floor_ms(rows: list[dict], pcie_gbs: float, bare_ms: float) -> float:
    """Bytes moved at the measured PCIe peak, plus one question forward without retrieval."""
    bytes_q = statistics.mean(r["bytes"] for r in rows)
    return (bytes_q / (pcie_gbs * 1e9) if pcie_gbs else 0.0) * 1e3 + bare_ms


def decode_rescoring(engine: Engine, s: BenchSettings, log) -> dict:
    """Decode speed and fidelity when clusters are re-chosen every N generated tokens (0: once per question).

    Fidelity is the attention recall of each decode step's queries against the oracle top-k over the whole
    history, with the clusters that step actually attended to.
    """
    default, results = engine.config, {}
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(s.decode_questions)]
    for every in (0, 8, 4, 1):
        engine.config = dataclasses.replace(default, rescore_every_tokens=every)
        rows = ask_many(engine, s, "cam", questions, s.device)
        probed = [
            engine.answer("cam", q, max_new_tokens=s.recall_decode_tokens, measure_recall=True).retrieval
            for q in questions[:2]
        ]
        decode_recalls = [r.decode_attention_recall for r in probed if r.decode_attention_recall is not None]
        results[str(every)] = {
            "decode_ms_per_token": statistics.median(r["decode_s_per_token"] for r in rows) * 1e3,
            "decode_bytes_per_question": statistics.mean(r["bytes"] for r in rows),
            "decode_recall": statistics.mean(decode_recalls) if decode_recalls else None,
            "prefill_recall": statistics.mean(r.attention_recall for r in probed),
        }
        log(f"decode/rescore every {every}: {json.dumps(results[str(every)])}")
    engine.config = default
    return results


def _transfer_gbs(rows) -> float:
    moved = sum(r["bytes"] for r in rows)
    seconds = sum(r["transfer_s"] for r in rows)
    return moved / seconds / 1e9 if seconds > 0 else 0.0


def bare_question_ms(model, s: BenchSettings) -> float:
    """Time to first token of a question on a stream with no history: the floor's forward term."""
    engine = Engine(model, engine_config(s, RetrievalMode.CLUSTER))
    engine.open_stream("bare")
    engine.answer("bare", QUESTIONS[0], max_new_tokens=1)
    times = [engine.answer("bare", q, max_new_tokens=1).timings.time_to_first_token_s for q in QUESTIONS]
    return statistics.median(times) * 1e3


def _effective_gbs(rows) -> float:
    moved = [(r["bytes"], r["ttft_s"]) for r in rows if r["bytes"] > 0]
    if not moved:
        return 0.0
    return statistics.median(b / t for b, t in moved) / 1e9


def profile_ingest(engine: Engine, batches: list[list[FrameInput]], path: Path) -> None:
    """torch.profiler over a few ingest calls: where an ingest pass spends host and device time."""
    from torch.profiler import ProfilerActivity, profile

    # after everything the cameras sent so far
    shifted = [[dataclasses.replace(f, timestamp_s=10_000.0 + k) for f in batch] for k, batch in enumerate(batches)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in shifted:
            engine.ingest(batch)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    path.write_text(
        averages.table(sort_by="self_cpu_time_total", row_limit=30)
        + "\n\n"
        + averages.table(sort_by="self_cuda_time_total", row_limit=30)
    )


def scenario_b(model, s: BenchSettings, log, profile_to: Path | None = None) -> dict:
    """Many cameras, batched ingest under a small device budget, then questions while ingest continues."""
    per_camera = [
        looped_frames(s.camera_seconds, stream_id=f"cam{c:03d}", clip=CLIPS[c % len(CLIPS)], start_s=0.0)
        for c in range(s.cameras)
    ]
    results = {}
    for mode in (RetrievalMode.TOKEN, RetrievalMode.CLUSTER):
        # A small window per camera keeps 32 windows well inside a device budget far below the cameras' KV.
        config = dataclasses.replace(
            engine_config(s, mode),
            max_frames_per_pass=1,
            local_window_tokens=s.camera_window_tokens,
            device_budget_bytes=s.camera_device_budget_bytes,
            # 32 open clusters of 8 frames fit next to 32 windows in the budget, so cameras grow their clusters
            # on the device and spill them once sealed
            formation=FormationConfig(max_tokens=min(s.cluster_tokens, 8 * s.tokens_per_frame)),
        )
        history_bytes = s.cameras * s.camera_seconds * s.tokens_per_frame * model.kv_spec.bytes_per_token
        config = dataclasses.replace(config, pinned_host_bytes=pinned_bytes(history_bytes, s))
        engine = Engine(model, config)
        for c in range(s.cameras):
            engine.open_stream(f"cam{c:03d}")
        half = s.camera_seconds // 2
        engine.ingest([frames[0] for frames in per_camera])  # warm-up: the first pass compiles and allocates
        t0 = time.perf_counter()
        encode_s = []
        for second in range(1, half):
            encode_s.append(engine.ingest([frames[second] for frames in per_camera]).encode_s)
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        ingest_s = time.perf_counter() - t0
        fps = s.cameras * (half - 1) / ingest_s

        rng = random.Random(0)
        ttfts = []
        for second in range(half, s.camera_seconds):
            engine.ingest([frames[second] for frames in per_camera])
            camera = f"cam{rng.randrange(s.cameras):03d}"
            answer = engine.answer(camera, rng.choice(QUESTIONS), max_new_tokens=2)
            ttfts.append(answer.timings.time_to_first_token_s)
        if profile_to is not None and mode is RetrievalMode.CLUSTER:
            profile_ingest(engine, [[frames[k] for frames in per_camera] for k in range(3)], profile_to)
        stats = engine.stats()
        total_kv = sum(sum(engine.stream_stats(f"cam{c:03d}").bytes_by_tier.values()) for c in range(s.cameras))
        results[mode.value] = {
            "cameras": s.cameras,
            "total_kv_bytes": total_kv,
            "device_budget_bytes": config.device_budget_bytes,
            "ingest_frames_per_s": fps,
            "realtime_cameras": fps / 1.0,
            "ingest_pass_ms": ingest_s / (half - 1) * 1e3,
            "vision_ms_per_pass": statistics.median(encode_s) * 1e3,
            "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
            "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
            "hit_ratio": stats.device_hit_ratio if mode is RetrievalMode.CLUSTER else 0.0,
            "device_bytes_used": stats.used_bytes_by_tier["device"],
            "host_bytes_used": stats.used_bytes_by_tier["host"],
        }
        log(f"B/{mode.value}: {json.dumps(results[mode.value])}")
        del engine
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, small sizes; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument("--device-budget-gib", type=float, default=8.0)
    parser.add_argument("--cameras", type=int, default=32)
    parser.add_argument("--scenarios", default="A,B", help="comma-separated: A (with C), B")
    parser.add_argument("--out", default="bench/out/results.json")
    parser.add_argument("--profile-ingest", action="store_true", help="write a torch.profiler table of B's ingest")
    args = parser.parse_args(argv)
    s = BenchSettings.from_args(args)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {s.model} on {s.device} ({s.dtype})")
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    pcie = measure_pcie_peak(s.device)
    log(f"pinned host->device peak: {pcie:.1f} GB/s")
    report = {"settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}, "pcie_gbs": pcie}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    scenarios = set(args.scenarios.upper().split(","))
    if "A" in scenarios:
        report["A"], report["C"], report["decode"] = scenario_a(model, s, pcie, log)
    if "B" in scenarios:
        profile_to = Path(args.out).with_suffix(".ingest-profile.txt") if args.profile_ingest else None
        report["B"] = scenario_b(model, s, log, profile_to if s.device.startswith("cuda") else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    from bench.report import format_report

    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
