"""Keyframe thumbnails of a whole ingest call, made on the device from the frames uploaded for the vision tower.

    uploaded frames [n, H, W, 3] uint8 (per source size)
      -> rows and columns strided down to about twice the thumbnail, then a bilinear resize with antialias
      -> [n, h, w, 3] uint8, copied to pinned host memory without waiting
      -> ``ThumbnailBatch.small(position)`` as frames are placed (the host has waited for the tower by then)

Made one frame at a time on the host, thumbnails took about 0.8 ms a frame of the engine thread on an H200 host
(106 of an 867 ms pass at 128 cameras, bench/NOTES.md, session 13). Here a call's thumbnails are a few kernels
queued before its vision tower.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mosaic_core.memory.transfer import NOTHING_PENDING, read_back
from mosaic_core.model.frame_upload import UploadedFrames


def thumbnail_size(height: int, width: int, long_side_px: int) -> tuple[int, int]:
    """``(h, w)`` with ``max(h, w) <= long_side_px`` and the frame's aspect; never larger than the frame."""
    scale = min(1.0, long_side_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def make_thumbnails(frames: torch.Tensor, long_side_px: int) -> torch.Tensor:
    """``[n, H, W, 3]`` uint8 frames to ``[n, h, w, 3]`` uint8 thumbnails (``thumbnail_size``), where they are."""
    height, width = frames.shape[1:3]
    size = thumbnail_size(height, width, long_side_px)
    if size == (height, width):
        return frames
    step = max(1, int(max(height, width) / long_side_px) // 2)  # cheap first: about twice the size, no blending
    pixels = frames[:, ::step, ::step].permute(0, 3, 1, 2).to(torch.float32)
    small = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    return small.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def thumbnail(rgb: np.ndarray, long_side_px: int) -> np.ndarray:
    """One ``[H, W, 3]`` uint8 frame's thumbnail, on the host."""
    return make_thumbnails(torch.from_numpy(np.ascontiguousarray(rgb))[None], long_side_px)[0].numpy()


class ThumbnailBatch:
    """The thumbnails of every frame of an upload, on their way to host memory."""

    def __init__(self, uploaded: UploadedFrames, long_side_px: int) -> None:
        self._where: dict[int, tuple[torch.Tensor, int]] = {}  # position -> (host tensor of its group, row)
        self._copied = NOTHING_PENDING  # the last group's copy: the earlier ones ran before it, on one stream
        for positions, frames in uploaded.groups:
            host, self._copied = read_back(make_thumbnails(frames, long_side_px))
            for row, position in enumerate(positions):
                self._where[position] = (host, row)

    def small(self, position: int) -> np.ndarray:
        """The thumbnail of the frame at ``position`` of the upload, as an array of its own."""
        if self._copied.ready is not None:
            self._copied.ready.synchronize()
        host, row = self._where[position]
        return host[row].numpy().copy()
