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
  questions at random cameras between ingest passes (``mosaic_core/bench/scenario_b.py``).
- C: peak memory and time to first token at growing stream lengths (checkpoints of scenario A's ingest).

Timings on CUDA use events around the region after a warm-up question, and medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mosaic_core.bench.b_pauses import PauseVariant
from mosaic_core.bench.scenario_a import QUESTIONS as A_QUESTIONS
from mosaic_core.bench.scenario_b import scenario_b
from mosaic_core.bench.settings import (
    CAMERA_SECONDS,
    RECALL_QUESTIONS,
    BenchSettings,
    engine_config,
    pinned_bytes,
    sized_to_machine,
)
from mosaic_core.bench.workload import CLIPS, QUESTIONS, clip_list, looped_frames
from mosaic_core.config import GIB, MIB, EngineConfig, RetrievalMode
from mosaic_core.engine.engine import Engine
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.vision_attention import VISION_ATTENTION_BACKENDS


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


def bare_question_ms(model, s: BenchSettings) -> float:
    """Time to first token of a question on a stream with no history: the floor's forward term."""
    engine = Engine(model, engine_config(s, RetrievalMode.CLUSTER))
    engine.open_stream("bare")
    engine.answer("bare", QUESTIONS[0], max_new_tokens=1)
    times = [engine.answer("bare", q, max_new_tokens=1).timings.time_to_first_token_s for q in QUESTIONS]
    return statistics.median(times) * 1e3


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
    _add_scenario_flags(parser)
    _add_b_engine_flags(parser)
    args = parser.parse_args(argv)
    _add_parsed_settings(args, parser)
    return args


def _add_scenario_flags(parser: argparse.ArgumentParser) -> None:
    """The model, the scenarios run, their sizes, and where the results go."""
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


def _add_b_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Scenario B's engine settings, run side by side where a flag takes several; and the vision tower's attention."""
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
        "--b-clips", type=clip_list, default=CLIPS,
        help="sample clips scenario B's cameras loop, in turn, comma-separated (a GPU call may carry bikes.mp4 alone)",
    )  # fmt: skip
    parser.add_argument(
        "--b-tower-stream", default="off",
        help="scenario B's EngineConfig.tower_stream settings, comma-separated (off, on), each run side by side: on "
        "queues each call's vision tower on a CUDA stream of its own",
    )  # fmt: skip


def _add_parsed_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks the flags that take lists and ranges, adding what they parse to ``args``; exits with argparse's
    usage error on a bad one."""
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
                clips=args.b_clips,
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
