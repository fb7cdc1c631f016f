"""Host memory pinned once, up front, and handed out to host-tier clusters.

Pinning memory (``cudaHostAlloc``) costs about half a millisecond per MiB and blocks the calling thread. With
clusters pinned one by one as they spill, the 32-camera ingest profile spent 35 ms per spill in it, a third of
the host time of a pass (bench/NOTES.md). The pool pins its chunks when the engine starts and then places each
host-tier cluster in a free range (first fit, neighbours coalesced on release).

A released range may still be read by moves queued on the transfer engine's side stream (a promotion or a
gather reading it in place), so a release carries the side stream's fence: the range is reused only after that
fence has passed.
"""

from __future__ import annotations

import bisect
from collections import deque

import torch

ALIGN_BYTES = 512


class PinnedPool:
    """First-fit ranges inside a few large pinned chunks (``pin=False`` only for tests without CUDA)."""

    def __init__(self, capacity_bytes: int, *, chunk_bytes: int = 1 << 30, pin: bool = True) -> None:
        self._chunks: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per chunk: sorted (offset, size)
        remaining = capacity_bytes
        while remaining > 0:
            size = min(chunk_bytes, remaining)
            self._chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
            self._free.append([(0, size)])
            remaining -= size
        self._in_use: dict[int, tuple[int, int, int]] = {}  # data_ptr -> (chunk, offset, size)
        self._fenced: deque[tuple[torch.cuda.Event | None, int, int, int]] = deque()
        self.capacity_bytes = capacity_bytes

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """A pinned tensor of ``shape`` from the pool, or None when no free range is large enough."""
        size = _aligned(torch.Size(shape).numel() * dtype.itemsize)
        self._reclaim(wait=False)
        found = self._first_fit(size)
        if found is None and self._fenced:
            self._reclaim(wait=True)
            found = self._first_fit(size)
        if found is None:
            return None
        chunk, offset = found
        tensor = self._chunks[chunk][offset : offset + size].view(dtype)[: torch.Size(shape).numel()].view(shape)
        self._in_use[tensor.data_ptr()] = (chunk, offset, size)
        return tensor

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.data_ptr() in self._in_use

    def release(self, tensor: torch.Tensor, *, fence: torch.cuda.Event | None) -> None:
        """Returns ``tensor``'s range, reusable once ``fence`` (if any) has passed."""
        chunk, offset, size = self._in_use.pop(tensor.data_ptr())
        self._fenced.append((fence, chunk, offset, size))

    @property
    def free_bytes(self) -> int:
        fenced = sum(size for _, _, _, size in self._fenced)
        return fenced + sum(size for ranges in self._free for _, size in ranges)

    def _first_fit(self, size: int) -> tuple[int, int] | None:
        for chunk, ranges in enumerate(self._free):
            for i, (offset, free) in enumerate(ranges):
                if free >= size:
                    if free == size:
                        del ranges[i]
                    else:
                        ranges[i] = (offset + size, free - size)
                    return chunk, offset
        return None

    def _reclaim(self, *, wait: bool) -> None:
        while self._fenced:
            fence, chunk, offset, size = self._fenced[0]
            if fence is not None and not fence.query():
                if not wait:
                    return
                fence.synchronize()
            self._fenced.popleft()
            self._insert(chunk, offset, size)

    def _insert(self, chunk: int, offset: int, size: int) -> None:
        ranges = self._free[chunk]
        i = bisect.bisect_left(ranges, (offset, 0))
        ranges.insert(i, (offset, size))
        if i + 1 < len(ranges) and offset + size == ranges[i + 1][0]:  # merge with the next range
            ranges[i] = (offset, size + ranges[i + 1][1])
            del ranges[i + 1]
        if i > 0 and ranges[i - 1][0] + ranges[i - 1][1] == offset:  # and with the previous one
            ranges[i - 1] = (ranges[i - 1][0], ranges[i - 1][1] + ranges[i][1])
            del ranges[i]


def _aligned(num_bytes: int) -> int:
    return max(ALIGN_BYTES, -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES)
