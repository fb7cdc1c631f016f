"""Small host->device uploads through one pinned buffer kept for good, cut into segments that are reused in turn.

``transfer.upload`` sends thousands of small tables a second (slot tables, page ids, row numbers). Staging each in
a pinned block of its own (``pin_memory()``) asks PyTorch's caching host allocator for a block, which queries the
events of outstanding blocks, and records an event when the block is freed. Here the host writes each table into
the next aligned slice of a ring, and waits for the device only when a segment comes round again:

    buffer:  | seg 0          | seg 1          | seg 2          | ... | seg 7          |
               closed: fences   closed: fences   open
                                                 [a ][b   ][c]..
                                                              ^ next slice, at a multiple of 256 bytes

- a slice is taken from the open segment, and the stream its copy runs on is noted among the segment's readers;
- when the next slice does not fit, the open segment is closed: an event (a fence) is recorded on each of its
  readers, so it passes once every copy out of the segment has run. The next segment is opened once the fences
  of its own last closing have passed: that was ``num_segments - 1`` closings ago, so normally long since;
- a table larger than a segment, a dtype numpy cannot hold (bfloat16), or an upload while the stream is capturing
  a CUDA graph (the graph would read the slice again at every replay, long after it was reused) gets a pinned
  block of its own, as before (``pinned_upload``).

``RingSegments`` is the arithmetic alone (plain Python, tested without CUDA); ``UploadRing`` puts torch under it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CAPACITY_BYTES = 8 * 1024 * 1024
DEFAULT_NUM_SEGMENTS = 8
ALIGN_BYTES = 256


def pinned_upload(values: np.ndarray | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device copy of ``values`` staged in a pinned block of its own, which PyTorch's caching host allocator keeps
    until the copy has run (the path before the ring, and its fallback)."""
    return torch.as_tensor(np.asarray(values), dtype=dtype).pin_memory().to(device, non_blocking=True)


@dataclass(slots=True)
class Turn:
    """The ring moved from segment ``closed`` to ``opened``. Record a fence on each of ``readers`` (the streams that
    copied out of ``closed``) and hand them to ``RingSegments.seal``; then wait for ``wait_for`` (the fences of
    ``opened``'s last closing) before writing into it."""

    closed: int
    readers: list[Hashable]
    opened: int
    wait_for: list


@dataclass(slots=True)
class Slice:
    """Where a table goes: ``num_bytes`` (rounded up to the alignment) from ``start_bytes`` of the buffer."""

    segment: int
    start_bytes: int
    num_bytes: int
    turn: Turn | None  # set when taking this slice closed the open segment


class RingSegments:
    """Which slice of the ring comes next, who reads each segment, and what must pass before one is reused."""

    def __init__(self, *, capacity_bytes: int, num_segments: int, align_bytes: int = ALIGN_BYTES) -> None:
        if align_bytes <= 0 or align_bytes & (align_bytes - 1):
            raise ValueError(f"align_bytes must be a power of two, got {align_bytes}")
        if num_segments < 2:  # with one, a closing segment would reopen before its own fences were recorded
            raise ValueError(f"num_segments must be at least 2, got {num_segments}")
        segment_bytes = capacity_bytes // num_segments // align_bytes * align_bytes
        if segment_bytes <= 0:
            raise ValueError(
                f"capacity_bytes={capacity_bytes} leaves no aligned segment: needs at least "
                f"num_segments x align_bytes = {num_segments * align_bytes}"
            )
        self.segment_bytes = segment_bytes
        self.num_segments = num_segments
        self.align_bytes = align_bytes
        self.open_segment = 0
        self.offset_bytes = 0  # taken from the open segment
        self._readers: list[dict[Hashable, None]] = [{} for _ in range(num_segments)]  # ordered sets
        self._fences: list[list] = [[] for _ in range(num_segments)]  # recorded at each segment's last closing
        self._unsealed: int | None = None  # closed by the last take, its fences not handed over yet

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the buffer the segments cover."""
        return self.segment_bytes * self.num_segments

    def can_take(self, num_bytes: int) -> bool:
        """Whether a table of ``num_bytes`` goes through the ring at all (it is no larger than a segment)."""
        return num_bytes <= self.segment_bytes

    def take(self, num_bytes: int, reader: Hashable) -> Slice | None:
        """The next slice of ``num_bytes``, which ``reader`` (a stream) will copy out of; None when larger than a
        segment. When it does not fit the open segment, the segment is closed and the next one opened; the slice's
        ``turn`` then says what to record (pass it to ``seal`` before the next take) and what to wait for."""
        assert self._unsealed is None, f"segment {self._unsealed} was closed but its fences were never sealed"
        size = -(-num_bytes // self.align_bytes) * self.align_bytes
        if size > self.segment_bytes:
            return None
        turn = self._turn() if self.offset_bytes + size > self.segment_bytes else None
        start = self.open_segment * self.segment_bytes + self.offset_bytes
        self.offset_bytes += size
        self._readers[self.open_segment][reader] = None
        return Slice(segment=self.open_segment, start_bytes=start, num_bytes=size, turn=turn)

    def seal(self, segment: int, fences: list) -> None:
        """The fences recorded on the readers of ``segment`` as it closed; waited for when it is next opened."""
        assert segment == self._unsealed, f"sealing segment {segment}, but the one awaiting fences is {self._unsealed}"
        self._fences[segment] = list(fences)
        self._unsealed = None

    def _turn(self) -> Turn:
        closed, opened = self.open_segment, (self.open_segment + 1) % self.num_segments
        readers, self._readers[closed] = list(self._readers[closed]), {}
        wait_for, self._fences[opened] = self._fences[opened], []
        self.open_segment, self.offset_bytes, self._unsealed = opened, 0, closed
        return Turn(closed=closed, readers=readers, opened=opened, wait_for=wait_for)


class UploadRing:
    """Copies small host tables to one CUDA ``device`` through a pinned ring; callable from several threads."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        num_segments: int = DEFAULT_NUM_SEGMENTS,
    ) -> None:
        self.device = torch.device(device)
        self.segments = RingSegments(capacity_bytes=capacity_bytes, num_segments=num_segments)
        self._buffer = torch.empty(self.segments.capacity_bytes, dtype=torch.uint8, pin_memory=True)
        # The buffer seen as each dtype, by torch (the copy's source) and numpy (where the host writes); None: numpy
        # has no such dtype. Filled lazily; two threads filling one entry at once store equal values.
        self._views: dict[torch.dtype, tuple[torch.Tensor, np.ndarray] | None] = {}
        # Held from taking a slice until its copy is queued: were a segment closed by another thread in between, its
        # fences would be recorded before this copy, and the slice could be rewritten while the copy still reads it.
        self._lock = threading.Lock()

    def upload(self, values: np.ndarray | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A device copy of ``values`` as ``dtype``, queued on the current stream without waiting for the device
        (unless the segment it needs is still being read, ``num_segments - 1`` segments ago)."""
        host = np.asarray(values)
        views = self._typed(dtype)
        num_bytes = host.size * dtype.itemsize
        if views is None or not self.segments.can_take(num_bytes) or torch.cuda.is_current_stream_capturing():
            return pinned_upload(host, dtype, self.device)
        out = torch.empty(host.shape, dtype=dtype, device=self.device)
        if host.size == 0:
            return out
        typed, typed_np = views
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            taken = self.segments.take(num_bytes, stream)
            assert taken is not None, f"{num_bytes} bytes passed can_take but no slice was given"
            if taken.turn is not None:
                self._turn(taken.turn)
            first = taken.start_bytes // dtype.itemsize
            np.copyto(typed_np[first : first + host.size].reshape(host.shape), host, casting="unsafe")
            out.copy_(typed[first : first + host.size].view(host.shape), non_blocking=True)
        return out

    def _turn(self, turn: Turn) -> None:
        fences = []
        for stream in turn.readers:
            fence = torch.cuda.Event()
            fence.record(stream)
            fences.append(fence)
        self.segments.seal(turn.closed, fences)
        for fence in turn.wait_for:
            fence.synchronize()  # every copy out of the segment has run: it may be written again

    def _typed(self, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray] | None:
        if dtype not in self._views:
            try:
                typed = self._buffer.view(dtype)
                self._views[dtype] = (typed, typed.numpy())
            except (TypeError, RuntimeError):  # bfloat16, float8: no numpy dtype to write them through
                self._views[dtype] = None
        return self._views[dtype]
