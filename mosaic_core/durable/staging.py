"""Host memory for the KV snapshots of sealed clusters that wait for their record files, pinned once up front.

A sealed cluster's KV is copied off the device into host memory that must stay as it is until its record file is
written. Pinned memory lets that copy run on the side stream without holding the engine thread, but pinning
memory is slow (the kernel locks every page), and the caching host allocator pins a new block each time the
snapshots waiting for the writers outgrow what it holds, on the engine thread, in the middle of an ingest pass.
``StagingArena`` pins all of it once, when the engine starts, and hands out pieces of it:

    arena:  [ c12 pages | c14 pages |   free   | c9 pages |        free        ]
    take(c15) -> first free run long enough;  give_back(c12) -> merged with its free neighbours

When no run is long enough, ``take`` waits until the writers give enough back: the arena's size bounds the
snapshots in flight, as ``durable_pending_bytes`` does.

It may wait only for pieces the writers hold. Pieces are taken on one thread (the engine's), and a piece reaches the
writers when the store is handed its seal (``hand_over``); until then only that thread can give it back, and it is
the one waiting. A split takes both halves' pieces before it hands them over in one commit, so the second half
must not wait for room that only the first half's piece could leave (it never would: the wait would never end):

    arena:  [ c9 (writers) | first half (not handed over) |  free  ]     second half: 2 runs' worth
    room that can come:    [        c9's run       ]  +  [  free  ]      fits only if one of them is long enough

``fits`` answers with the pieces not handed over kept where they are, and a snapshot that does not fit is taken
outside the arena, as one larger than the whole arena is.
"""

from __future__ import annotations

import bisect
import threading
import time

import torch

ALIGN_BYTES = 512  # every piece starts on this boundary, so any dtype's view of it is aligned
WAIT_S = 0.5


class StagingArena:
    """``num_bytes`` of host memory (pinned with ``pin``), handed out as typed tensors; thread-safe."""

    def __init__(self, num_bytes: int, *, pin: bool) -> None:
        if num_bytes < ALIGN_BYTES:
            raise ValueError(f"a staging arena needs at least {ALIGN_BYTES} bytes, got {num_bytes}")
        self.num_bytes = num_bytes - num_bytes % ALIGN_BYTES
        self._buffer = torch.empty(self.num_bytes, dtype=torch.uint8, pin_memory=pin)
        self._base = self._buffer.data_ptr()
        self._free_starts = [0]  # free runs, sorted by start
        self._free_sizes = {0: self.num_bytes}  # start -> length
        self._taken: dict[int, int] = {}  # start -> length
        self._handed_over: set[int] = set()  # starts of the taken pieces the writers hold (module doc)
        self._cv = threading.Condition()
        self.wait_s = 0.0  # time spent in ``take`` waiting for room

    @property
    def taken_bytes(self) -> int:
        with self._cv:
            return sum(self._taken.values())

    def fits(self, num_bytes: int) -> bool:
        """Whether a piece of ``num_bytes`` can be taken now or once the writers give back what they hold: a run
        that long lies between the pieces not handed over (module doc)."""
        needed = _aligned(num_bytes)
        with self._cv:
            kept = sorted((start, n) for start, n in self._taken.items() if start not in self._handed_over)
        run_start = 0
        for start, length in [*kept, (self.num_bytes, 0)]:
            if start - run_start >= needed:
                return True
            run_start = start + length
        return False

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor inside the arena; waits until a free run is long enough.

        Raises:
            ValueError: no run that long can come (check with ``fits``): the tensor is larger than the arena, or
                than any run the pieces not handed over leave.
        """
        num_bytes = _aligned(torch.Size(shape).numel() * dtype.itemsize)
        if not self.fits(num_bytes):
            raise ValueError(
                f"a {num_bytes}-byte snapshot cannot fit a {self.num_bytes}-byte staging arena beside the "
                f"{self._kept_bytes()} bytes of pieces not handed over"
            )
        with self._cv:
            start = self._first_fit(num_bytes)
            if start is None:
                waited = time.monotonic()
                while (start := self._first_fit(num_bytes)) is None:
                    self._cv.wait(WAIT_S)
                self.wait_s += time.monotonic() - waited
            self._take_run(start, num_bytes)
        piece = self._buffer[start : start + torch.Size(shape).numel() * dtype.itemsize]
        return piece.view(dtype).view(shape)

    def owns(self, tensor: torch.Tensor) -> bool:
        return self._base <= tensor.data_ptr() < self._base + self.num_bytes

    def hand_over(self, tensor: torch.Tensor) -> None:
        """Notes that the piece ``take`` returned as ``tensor`` is the writers' now, who give it back once written:
        room a ``take`` may wait for."""
        start = tensor.data_ptr() - self._base
        with self._cv:
            if start not in self._taken:
                raise ValueError(f"the staging arena handed out no piece at offset {start}")
            self._handed_over.add(start)

    def give_back(self, tensor: torch.Tensor) -> None:
        """Frees the piece that ``take`` returned as ``tensor`` (or a view starting where it starts)."""
        start = tensor.data_ptr() - self._base
        with self._cv:
            num_bytes = self._taken.pop(start, None)
            if num_bytes is None:
                raise ValueError(f"the staging arena handed out no piece at offset {start}")
            self._handed_over.discard(start)
            self._add_free(start, num_bytes)
            self._cv.notify_all()

    def _kept_bytes(self) -> int:
        with self._cv:
            return sum(n for start, n in self._taken.items() if start not in self._handed_over)

    def _first_fit(self, num_bytes: int) -> int | None:
        for start in self._free_starts:
            if self._free_sizes[start] >= num_bytes:
                return start
        return None

    def _take_run(self, start: int, num_bytes: int) -> None:
        run = self._free_sizes.pop(start)
        self._free_starts.remove(start)
        if run > num_bytes:
            bisect.insort(self._free_starts, start + num_bytes)
            self._free_sizes[start + num_bytes] = run - num_bytes
        self._taken[start] = num_bytes

    def _add_free(self, start: int, num_bytes: int) -> None:
        i = bisect.bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and self._free_starts[i] == start + num_bytes:  # merge the run after
            num_bytes += self._free_sizes.pop(self._free_starts.pop(i))
        if i > 0 and (before := self._free_starts[i - 1]) + self._free_sizes[before] == start:  # and before
            self._free_sizes[before] += num_bytes
            return
        self._free_starts.insert(i, start)
        self._free_sizes[start] = num_bytes


def _aligned(num_bytes: int) -> int:
    return max(ALIGN_BYTES, -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES)
