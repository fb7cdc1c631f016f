"""Camera frames onto the model's device: one upload per batch, grouped by source size, through reused pinned memory.

    frames (numpy, any sizes)  ->  group by size  ->  copy into the staging buffer  ->  one async copy per group
                                                     (pinned, reused across calls)      [n, H, W, 3] uint8 on the device

Joining a batch's frames into fresh host memory (142 MB for 128 cameras of the sample clips) page-faults the new
buffer on every call, and a copy from pageable memory holds the host until it is done. Here the host copies each
frame once, into pinned memory that is kept and reused, and the device copy runs asynchronously. Before the buffer
is written again, the host waits until the device has read what was there.

Elsewhere (CPU) a group is simply stacked: nothing needs uploading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.model.pixels import frames_by_size

# The staging buffer never grows past this; a bigger group is uploaded in pieces that each fit.
MAX_STAGING_BYTES = 512 * 1024 * 1024


@dataclass(slots=True)
class UploadedFrames:
    """A batch of frames on the device, one ``[n, H, W, 3]`` uint8 tensor per source size, with each frame's
    position in the batch as given."""

    groups: list[tuple[list[int], torch.Tensor]]
    num_frames: int


class FrameStaging:
    """Uploads frame batches to ``device`` through one pinned host buffer, kept between calls."""

    def __init__(self, device: torch.device | str, *, max_bytes: int = MAX_STAGING_BYTES) -> None:
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self._buffer: torch.Tensor | None = None  # pinned uint8, on CUDA only
        self._offset = 0  # bytes of the buffer written since the device last finished reading it
        self._read: torch.cuda.Event | None = None  # recorded after the latest copy out of the buffer

    @property
    def num_bytes(self) -> int:
        """Pinned host memory held between calls."""
        return 0 if self._buffer is None else self._buffer.numel()

    def upload(self, frames: Sequence[np.ndarray]) -> UploadedFrames:
        """Frames ``[H, W, 3]`` (or ``[1, H, W, 3]``) uint8 of any sizes, on the device, grouped by size.

        Raises:
            EmptyBatchError, InvalidFrameError: as ``validate_frames``, for the sequence or any frame in it.
        """
        groups = []
        for positions, members in frames_by_size(frames):
            if self.device.type != "cuda":
                groups.append((positions, torch.from_numpy(np.stack(members)).to(self.device)))
            else:
                groups.append((positions, self._upload_group(members)))
        return UploadedFrames(groups=groups, num_frames=len(frames))

    def _upload_group(self, members: list[np.ndarray]) -> torch.Tensor:
        size = members[0].shape
        out = torch.empty((len(members), *size), dtype=torch.uint8, device=self.device)
        frame_bytes = members[0].nbytes
        per_piece = max(1, min(len(members), self.max_bytes // frame_bytes))
        for start in range(0, len(members), per_piece):
            piece = members[start : start + per_piece]
            host = self._take(len(piece) * frame_bytes).view(len(piece), *size)
            staged = host.numpy()
            for k, frame in enumerate(piece):
                staged[k] = frame
            out[start : start + len(piece)].copy_(host, non_blocking=True)
            self._read = torch.cuda.Event()
            self._read.record()
        return out

    def _take(self, num_bytes: int) -> torch.Tensor:
        """``num_bytes`` of the buffer no queued copy still reads; waits for the device when it must reuse."""
        if self._buffer is None or self._offset + num_bytes > self._buffer.numel():
            if self._read is not None:
                self._read.synchronize()  # every earlier copy out of the buffer is done: it may be overwritten
            self._offset = 0
            if self._buffer is None or num_bytes > self._buffer.numel():
                capacity = max(num_bytes, min(self.max_bytes, 2 * self.num_bytes))
                self._buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        taken = self._buffer[self._offset : self._offset + num_bytes]
        self._offset += num_bytes
        return taken
