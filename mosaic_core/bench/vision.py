"""The vision tower alone on a batch of camera frames: transformers' forward against Mosaic's, one table, one run.

    mosaic bench vision                       # GPU: qwen2.5-vl-7b's tower, bf16, 32/64/128 frames of 224x448
    mosaic bench vision --quick               # CPU: the tiny preset's tower (CI runs this so it cannot rot)

Rows, in this order (each adds one change to the row before it, on the same weights in the same process):
- ``transformers``: transformers' own vision attention (one SDPA call per window and per frame), its per-call
  position ids and window order, the 7B's 3,420-wide MLP;
- ``batched-chunks``: equal-length windows in one SDPA call, query and key rotated together
  (``vision_attention.py``; on CUDA by one Triton kernel, ``kernels/vision_rotary.py``);
- ``precomputed-inputs``: position ids, window order and chunk bounds kept per frame grid and batch size
  (``vision_tower.TowerInputs``);
- ``padded-mlp``: MLPs widened to a multiple of 64 with zero units (``vision_tower.pad_mlp_widths``): every row
  above it runs unpadded;
- ``matmul-patch-embed``: the patch embedding as one matrix product instead of a 3-D convolution
  (``vision_tower.embed_patches_by_matmul``);
- ``compiled-elementwise`` (GPU only, with ``--compiled``; the engine's tower on CUDA, whose attention the engine
  also holds to FlashAttention: ``--sdpa-backend flash``): each RMSNorm and each SiLU MLP run functions compiled
  with ``torch.compile`` (``vision_tower.fuse_elementwise``), so their element-wise kernels fuse; its first-call
  time (the compile) is the row's ``warm_up_s``;
- ``varlen-chunks`` (GPU only, with ``--varlen``): a frame's chunks of several lengths in one variable-length Flash
  call a block (``hold_vision_attention(..., "varlen")``). Frames of 360x640 are a whole number of windows, with
  one length a block; ``--source 272x640`` (the service bench's clip) gives edge windows of four lengths.

Per row and batch size: median ms per call over ``--repeats`` calls after two warm-up calls (CUDA synchronised
around each), frames/s, and the largest absolute difference of its output from the ``transformers`` row's
(beside the largest absolute value of that row's output, so the difference reads against its scale). The JSON
also has each row and size's ``warm_up_s``, what its two warm-up calls took together: against two calls' time, it
shows what a batch size's first call builds per shape (compiled kernels, attention plans), which an ingest call of
a new size pays too.

``--sdpa-backend flash|efficient|cudnn|math`` runs every row with PyTorch's scaled-dot-product attention held to
that backend (``torch.nn.attention.sdpa_kernel``); by default PyTorch picks one per call. Running the bench once
per backend, with batch sizes close together (``--frames 120,121,122``), shows what a new size costs each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
)

from mosaic_core.model.geometry import choose_geometry
from mosaic_core.model.pixels import frames_to_vision_input
from mosaic_core.model.presets import preset_config_kwargs
from mosaic_core.model.vision_attention import BatchedChunkAttention, hold_vision_attention
from mosaic_core.model.vision_tower import (
    TowerInputs,
    embed_patches_by_matmul,
    fuse_elementwise,
    pad_mlp_widths,
    run_tower,
)

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
ROWS = ("transformers", "batched-chunks", "precomputed-inputs", "padded-mlp", "matmul-patch-embed")
COMPILED_ROW = "compiled-elementwise"
VARLEN_ROW = "varlen-chunks"


def build_tower(preset: str, device: str, dtype: torch.dtype) -> Qwen2_5_VisionTransformerPretrainedModel:
    """The preset's vision tower alone, random weights (seeded), transformers' own attention class."""
    vision_config = Qwen2_5_VLConfig(**preset_config_kwargs(preset)).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            vision_config, dtype=dtype, attn_implementation="sdpa"
        )
    return tower.eval()


def _set_attention(tower: torch.nn.Module, cls: type) -> None:
    for module in tower.modules():
        if isinstance(module, Qwen2_5_VLVisionAttention):
            module.__class__ = cls


def _timed(call, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(2):
        out = call()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.inference_mode()
def measure(
    preset: str,
    device: str,
    dtype: torch.dtype,
    batch_sizes: list[int],
    repeats: int,
    log,
    *,
    compiled: bool = False,
    varlen: bool = False,
    source: tuple[int, int] = (360, 640),
) -> dict:
    tower = build_tower(preset, device, dtype)
    config = tower.config
    geometry = choose_geometry(
        *source, target_tokens=128, patch_size=config.patch_size, merge_size=config.spatial_merge_size
    )
    rng = np.random.default_rng(0)
    inputs = {
        n: frames_to_vision_input(
            rng.integers(0, 255, (n, *source, 3), dtype=np.uint8), geometry, dtype=dtype, device=device
        )
        for n in batch_sizes
    }
    precomputed = TowerInputs(tower)
    rows = (*ROWS, *[COMPILED_ROW] * compiled, *[VARLEN_ROW] * varlen)
    results: dict[str, dict[int, dict]] = {row: {} for row in rows}
    reference: dict[int, torch.Tensor] = {}
    for row in rows:
        _change_tower_for(tower, row, log)
        for n in batch_sizes:
            vision = inputs[n]
            if row in ("transformers", "batched-chunks"):

                def call(vision=vision):
                    return tower(vision.pixel_values_videos, grid_thw=vision.video_grid_thw).pooler_output
            else:

                def call(vision=vision, n=n):
                    return run_tower(tower, vision.pixel_values_videos, precomputed.get(geometry, n, device))

            first = time.perf_counter()
            seconds, out = _timed(call, device, repeats)
            if row == "transformers":
                reference[n] = out.float()
            results[row][n] = {
                "ms_per_call": seconds * 1e3,
                "frames_per_s": n / seconds,
                "max_abs_diff_vs_transformers": float((out.float() - reference[n]).abs().max()),
                "max_abs_transformers_output": float(reference[n].abs().max()),
                "warm_up_s": time.perf_counter() - first - seconds * repeats,
            }
            log(f"{row} x{n}: {json.dumps(results[row][n])}")
    return {
        "geometry": f"{geometry.height_px}x{geometry.width_px}",
        "tokens_per_frame": geometry.tokens_per_frame,
        "mlp_width": config.intermediate_size,
        "rows": results,
    }


def _change_tower_for(tower: torch.nn.Module, row: str, log) -> None:
    """Makes the change ``row`` adds to the rows before it (the module docstring lists them), and logs what it
    changed."""
    _set_attention(tower, Qwen2_5_VLVisionAttention if row == "transformers" else BatchedChunkAttention)
    if row == "padded-mlp":
        log(f"widened {pad_mlp_widths(tower)} MLPs to a multiple of 64 units")
    if row == "matmul-patch-embed":
        log(f"patch embedding by matrix product: {embed_patches_by_matmul(tower)} module")
    if row == VARLEN_ROW:
        log(f"variable-length chunks in {hold_vision_attention(tower, 'varlen')} attentions")
    if row == COMPILED_ROW:
        log(f"fused the element-wise work of {fuse_elementwise(tower)} modules")


def format_table(report: dict) -> str:
    sizes = sorted({int(n) for row in report["rows"].values() for n in row})
    header = "row".ljust(20) + "".join(f" | {n:>4} frames: ms  f/s  diff".ljust(34) for n in sizes)
    lines = [
        f"vision tower, {report['geometry']} frames ({report['tokens_per_frame']} tokens each), "
        f"MLP {report['mlp_width']} wide, {report.get('device', '')}, attention backend "
        f"{report.get('sdpa_backend', 'default')}",
        header,
        "-" * len(header),
    ]
    for row, by_size in report["rows"].items():
        cells = []
        for n in sizes:
            r = by_size.get(n) or by_size.get(str(n))
            cells.append(
                f" | {r['ms_per_call']:9.1f} {r['frames_per_s']:6.0f} {r['max_abs_diff_vs_transformers']:.1e}".ljust(34)
            )
        lines.append(row.ljust(20) + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset on the CPU, 2 and 4 frames")
    parser.add_argument("--frames", default="32,64,128", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/out/vision.json")
    parser.add_argument("--compiled", action="store_true", help="add the torch.compile row (GPU only)")
    parser.add_argument("--varlen", action="store_true", help="add the variable-length attention row (GPU only)")
    parser.add_argument("--source", default="360x640", help="the frames' size, HEIGHTxWIDTH")
    parser.add_argument(
        "--sdpa-backend", choices=sorted(SDPA_BACKENDS), default=None,
        help="hold scaled-dot-product attention to this backend (default: PyTorch picks)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        preset, device, dtype, sizes = "tiny", "cpu", torch.float32, [2, 4]
    else:
        if not torch.cuda.is_available():
            parser.error("without a GPU, run --quick")
        preset, device, dtype = "qwen2.5-vl-7b", "cuda", torch.bfloat16
        sizes = [int(n) for n in args.frames.split(",") if n.strip()]
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    held = sdpa_kernel(SDPA_BACKENDS[args.sdpa_backend]) if args.sdpa_backend else contextlib.nullcontext()
    with held:
        report = measure(
            preset, device, dtype, sizes, args.repeats, log,
            compiled=args.compiled and not args.quick, varlen=args.varlen and not args.quick,
            source=tuple(int(n) for n in args.source.lower().split("x")),
        )  # fmt: skip
    report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report["sdpa_backend"] = args.sdpa_backend or "default"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"\nraw results (JSON): {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
