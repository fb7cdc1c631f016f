"""Camera frames to Qwen2-VL / Qwen2.5-VL vision inputs, without torchvision.

Each frame becomes its own one-step video: the frame is repeated ``temporal_patch_size`` times, which is
what the transformers video processor does when it pads a clip of one frame. The resize, rescale and
normalisation follow the transformers torch backend (torchvision bicubic with antialias on a uint8 tensor,
back to integers; then the fused ``(x - 255 * mean) / (255 * std)``), so the vision tower gets the same
values as from the transformers processor on the same device.

Patch layout of one frame, rows then columns of ``pixel_values_videos``::

    frame [C, H, W]  ->  H = (grid_h / m) * m * p,  W = (grid_w / m) * m * p      (p = patch, m = merge)

    rows:    (block_row, block_col, row_in_block, col_in_block)   # an m x m merge window: m*m rows in a row
    columns: (channel, temporal, patch_row, patch_col)            # C * T * p * p values

    e.g. m = 2, grid 4 x 6 patches:      row order of the 24 patches
        +----+----+----+                  0  1 |  4  5 |  8  9
        | w0 | w1 | w2 |                  2  3 |  6  7 | 10 11
        +----+----+----+                 ------+-------+------
        | w3 | w4 | w5 |                 12 13 | 16 17 | 20 21
        +----+----+----+                 14 15 | 18 19 | 22 23
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mosaic_core.errors import EmptyBatchError, InvalidFrameError
from mosaic_core.model.geometry import NUM_CHANNELS, VisionGeometry

# OPENAI CLIP statistics, which Qwen2-VL and Qwen2.5-VL normalise with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_FRAME_SIDE_PX = 8192


@dataclass(slots=True)
class VisionInput:
    """What the vision tower takes for a batch of frames, each frame its own one-step video."""

    pixel_values_videos: torch.Tensor  # [N * grid_h * grid_w, 3 * temporal_patch_size * patch * patch]
    video_grid_thw: torch.Tensor  # [N, 3] int64, each row (1, grid_h, grid_w)


def validate_frames(frames: np.ndarray) -> np.ndarray:
    """Checks a batch of RGB frames and returns it as a C-contiguous ``[N, H, W, 3]`` uint8 array.

    A single ``[H, W, 3]`` frame gets a batch dimension.

    Raises:
        EmptyBatchError: the batch holds no frames.
        InvalidFrameError: wrong type, dtype, rank or channel count, an empty side, or a side over 8192 px.
    """
    if not isinstance(frames, np.ndarray):
        raise InvalidFrameError(f"Frames must be a numpy array of uint8 RGB pixels, got {type(frames).__name__}.")
    if frames.dtype != np.uint8:
        raise InvalidFrameError(f"Frames must have dtype uint8, got {frames.dtype}.")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise InvalidFrameError(
            f"Frames must have shape [N, H, W, 3] or [H, W, 3], got rank {frames.ndim} shape {frames.shape}."
        )
    num_frames, height, width, channels = frames.shape
    if num_frames == 0:
        raise EmptyBatchError(f"The frame batch is empty: shape {frames.shape}.")
    if channels != NUM_CHANNELS:
        raise InvalidFrameError(f"Frames must have 3 RGB channels last, got {channels} in shape {frames.shape}.")
    if height == 0 or width == 0:
        raise InvalidFrameError(f"Frames must not have an empty side, got shape {frames.shape}.")
    if height > MAX_FRAME_SIDE_PX or width > MAX_FRAME_SIDE_PX:
        raise InvalidFrameError(
            f"Frames may be at most {MAX_FRAME_SIDE_PX} px a side, got {height}x{width} (height x width)."
        )
    return np.ascontiguousarray(frames)


def resize_frames(frames: np.ndarray, geometry: VisionGeometry, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Resizes validated ``[N, H, W, 3]`` uint8 frames to the geometry exactly as torchvision would
    (``resize_pixels``, after copying them to ``device``)."""
    return resize_pixels(torch.from_numpy(frames).to(device), geometry)


def resize_pixels(frames: torch.Tensor, geometry: VisionGeometry) -> torch.Tensor:
    """Resizes ``[N, H, W, 3]`` uint8 frames, where they are, to the geometry exactly as torchvision would.

    torchvision resizes uint8 natively on CPU (fixed-point bicubic, clamped between its two passes);
    elsewhere it resizes in float32, then clamps and rounds back to uint8. Both are copied, so the result is
    bit-identical to the transformers processor on the same device.

    Returns:
        ``[N, 3, height_px, width_px]`` float32 tensor of integer values in [0, 255].
    """
    pixels = frames.permute(0, 3, 1, 2)  # [N, 3, H, W] uint8, channels-last
    if pixels.shape[-2:] != (geometry.height_px, geometry.width_px):
        native_uint8 = pixels.device.type == "cpu"
        pixels = F.interpolate(
            pixels if native_uint8 else pixels.to(torch.float32),
            size=(geometry.height_px, geometry.width_px),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        if not native_uint8:
            pixels = pixels.clamp_(0, 255).round_()
    return pixels.to(torch.float32)


def patchify_frames(pixels: torch.Tensor, geometry: VisionGeometry) -> torch.Tensor:
    """Flattens ``[N, 3, height_px, width_px]`` frames into Qwen2-VL patch rows (layout in the module doc).

    Returns:
        ``[N * grid_h * grid_w, 3 * temporal_patch_size * patch * patch]`` tensor.
    """
    num_frames, channels = pixels.shape[:2]
    merge, patch = geometry.spatial_merge_size, geometry.patch_size
    blocks_h, blocks_w = geometry.llm_grid_h, geometry.llm_grid_w
    patches = pixels.reshape(num_frames, channels, blocks_h, merge, patch, blocks_w, merge, patch)
    # -> [N, blocks_h, blocks_w, merge_row, merge_col, C, patch_row, patch_col]
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    temporal = geometry.temporal_patch_size
    patches = patches.unsqueeze(6).expand(*patches.shape[:6], temporal, patch, patch)
    return patches.reshape(num_frames * geometry.num_patches_per_frame, geometry.patch_dim)


def resize_mixed_frames(
    frames: Sequence[np.ndarray], geometry: VisionGeometry, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``resize_frames`` for ``[H, W, 3]`` frames whose sizes may differ: one resize per size, results in order.

    Raises:
        EmptyBatchError, InvalidFrameError: as ``validate_frames``, for the sequence or any frame in it.
    """
    groups = [
        (positions, torch.from_numpy(np.stack(members)).to(device)) for positions, members in frames_by_size(frames)
    ]
    return resize_groups(groups, len(frames), geometry)


def frames_by_size(frames: Sequence[np.ndarray]) -> list[tuple[list[int], list[np.ndarray]]]:
    """Validated ``[H, W, 3]`` frames grouped by size: ``(positions in the sequence, frames)`` per size.

    Raises:
        EmptyBatchError, InvalidFrameError: as ``validate_frames``, for the sequence or any frame in it.
    """
    if len(frames) == 0:
        raise EmptyBatchError("The frame batch is empty: no frames were given.")
    checked = [validate_frames(frame) for frame in frames]
    if any(frame.shape[0] != 1 for frame in checked):
        raise InvalidFrameError("A sequence of frames must hold single [H, W, 3] frames, not batches.")
    by_size: dict[tuple[int, ...], tuple[list[int], list[np.ndarray]]] = {}
    for position, frame in enumerate(checked):
        positions, members = by_size.setdefault(frame.shape, ([], []))
        positions.append(position)
        members.append(frame[0])
    return list(by_size.values())


def resize_groups(groups: Sequence[tuple[list[int], torch.Tensor]], num_frames: int, geometry: VisionGeometry):
    """``resize_pixels`` per group of equal-sized ``[n, H, W, 3]`` uint8 frames; returns ``[num_frames, 3,
    height_px, width_px]`` float32 with each group's frames at its positions."""
    if len(groups) == 1:
        return resize_pixels(groups[0][1], geometry)
    device = groups[0][1].device
    out = torch.empty(num_frames, NUM_CHANNELS, geometry.height_px, geometry.width_px, device=device)
    for positions, frames in groups:
        index = torch.tensor(positions)
        if device.type == "cuda":  # from pageable memory the copy would first wait for everything queued
            index = index.pin_memory().to(device, non_blocking=True)
        out.index_copy_(0, index, resize_pixels(frames, geometry))
    return out


def frames_to_vision_input(
    frames: np.ndarray | Sequence[np.ndarray],
    geometry: VisionGeometry,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionInput:
    """Turns RGB frames into the vision tower's video inputs, one single-frame video per frame.

    Args:
        frames: ``[N, H, W, 3]`` (or ``[H, W, 3]``) uint8 RGB frames of any size up to 8192 px a side, or a
            sequence of ``[H, W, 3]`` frames of sizes that may differ (``resize_mixed_frames``).
        geometry: the size to resize to, and the patch grid.
        dtype: dtype of ``pixel_values_videos``; the arithmetic runs in float32 before the cast.
        device: where the resize runs and the tensors live.

    Raises:
        EmptyBatchError, InvalidFrameError: as ``validate_frames``.
    """
    if isinstance(frames, np.ndarray):
        pixels = resize_frames(validate_frames(frames), geometry, device=device)
    else:
        pixels = resize_mixed_frames(frames, geometry, device=device)
    return vision_input_from_pixels(pixels, geometry, dtype=dtype)


def vision_input_from_pixels(
    pixels: torch.Tensor, geometry: VisionGeometry, *, dtype: torch.dtype = torch.float32
) -> VisionInput:
    """The vision tower's inputs from resized ``[N, 3, height_px, width_px]`` float32 pixels (normalised in
    place)."""
    mean, std = _clip_scale(pixels.device)
    pixels = pixels.sub_(mean).div_(std)
    flat = patchify_frames(pixels, geometry).to(dtype)
    grid_row = _grid_row(pixels.device, geometry.grid_h, geometry.grid_w)
    return VisionInput(pixel_values_videos=flat, video_grid_thw=grid_row.repeat(pixels.shape[0], 1))


# Made once per device: a tensor built from Python values on a GPU is a pageable copy, which waits until the device
# has run everything queued before it. Built per call, they stopped the host at the start of every vision-tower call
# until the previous call's work was done (0.66 ms of host time a frame at 128 cameras on the H200; bench/NOTES.md,
# session 17).
@functools.cache
def _clip_scale(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-channel mean and standard deviation in 0..255 pixel units, ``[1, 3, 1, 1]`` each, on ``device``."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


@functools.cache
def _grid_row(device: torch.device, grid_h: int, grid_w: int) -> torch.Tensor:
    """One single-frame video's ``video_grid_thw`` row, ``[1, 3]``, on ``device``."""
    return torch.tensor([[1, grid_h, grid_w]], dtype=torch.long, device=device)
