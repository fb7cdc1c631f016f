"""The engine benchmark's sizes (``BenchSettings``), for ``--quick`` and for the GPU, and the engine config each
row starts from."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from mosaic_core.bench.workload import CLIPS, looped_frames
from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import (
    BENCH_DEVICE_BUDGET_SHARE,
    GIB,
    MIB,
    EngineConfig,
    RetrievalMode,
    device_budget_from_free,
)

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


def pinned_bytes(history_bytes: int, s: BenchSettings) -> int:
    """Host memory to pin up front for a run that keeps ``history_bytes`` of KV (token mode keeps it all on the
    host), plus slack for the ranges of growing clusters."""
    return int(history_bytes * 1.1) if s.device.startswith("cuda") else 0
