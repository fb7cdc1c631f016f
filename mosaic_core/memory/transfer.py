"""Every move of cluster KV between host and device, on one side CUDA stream ordered by events.

Compute (the model's forward passes) runs on the default stream; moves run on a side stream, so a question's
later layers can be gathered while its earlier layers compute, and a spill to the host does not stall ingest.

    default:  ... layer l-1 | wait(ready[l]) layer l | wait(ready[l+1]) layer l+1 ...
    side:     wait(default so far) gather l+1 | gather l+2 | spill c7 | ...
                                     ready[l+1]^  ready[l+2]^

Rules that keep it correct:
- each move first waits for the compute queued so far (its source or destination may still be in use there);
- a consumer waits for the move's ``ready`` event: the default stream with ``wait_event`` (no host sync), the host
  with ``synchronize`` (only before the CPU itself reads the bytes);
- a tensor allocated on the default stream that a move touches is marked used by the side stream, so the caching
  allocator does not hand its memory out again before the move ran.

Off CUDA there is no side stream: every move is a plain copy and ``ready`` is None.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.kernels.slab_gather import (
    copy_slab_table,
    copy_slab_table_reference,
    copy_slabs,
    gather_slabs,
    gather_slabs_reference,
)
from mosaic_core.memory import cudart

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Moved:
    """A move that was queued: its ``ready`` event, and the events that time its own span on the side stream.

    ``started`` may be recorded before the host prepared the move (its address table) or where the move before
    it in a chain ended. In a chain (``copy_runs``, ``stage_layers``) ``issued`` is recorded on the side stream just
    before the move's copies (after its wait for the compute queued so far, and, for the slab-copy kernel, after
    its table's upload), so ``issued`` to ``ready`` is the copies alone."""

    ready: torch.cuda.Event | None = None
    started: torch.cuda.Event | None = None
    issued: torch.cuda.Event | None = None

    def seconds(self) -> float:
        """Device time of the move with its host preparation (waits for it to finish); 0 off CUDA."""
        if self.ready is None or self.started is None:
            return 0.0
        self.ready.synchronize()
        return self.started.elapsed_time(self.ready) / 1e3

    def copy_seconds(self) -> float:
        """Device time of the move's copies alone, from ``issued`` (``seconds`` where it was not recorded)."""
        if self.ready is None or self.issued is None:
            return self.seconds()
        self.ready.synchronize()
        return self.issued.elapsed_time(self.ready) / 1e3


NOTHING_PENDING = Moved()


def read_back(values: torch.Tensor) -> tuple[torch.Tensor, Moved]:
    """A pinned host copy of small device ``values`` (coherence scores, thumbnails), queued on the current stream:
    it waits only for the work queued before it, not behind the side stream's KV moves. The host reads it after
    ``ready.synchronize()``. Off CUDA: ``values`` itself, with nothing pending."""
    if not values.is_cuda:
        return values, NOTHING_PENDING
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, Moved(ready=ready)


def upload(values: np.ndarray | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device copy of small host data (slot tables, page ids, row numbers), queued without waiting.

    A plain ``.to(device)`` from pageable memory makes PyTorch wait for the stream to drain, so the host stops
    running ahead of the device once per table; a pinned staging copy (the caching host allocator keeps it until
    the copy has run) lets it keep going. Off CUDA: a host tensor.
    """
    host = torch.as_tensor(np.asarray(values), dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class TransferEngine:
    """Queues host<->device moves on a side stream of ``device`` (or copies in place off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._helper_streams: list[torch.cuda.Stream] = []  # copy_runs' extra streams, made on first use
        self._batch_refused = False  # a batched call failed once: one call a run from then on

    def to_host(self, kv: torch.Tensor, *, pin: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Moved]:
        """A host copy of ``kv`` (into ``out`` when given); from the device it is filled asynchronously (the
        source stays allocated until then)."""
        host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=pin) if out is None else out
        if not kv.is_cuda or self.side is None:
            host.copy_(kv)
            return host, Moved()
        with self._on_side(kv) as moved:
            host.copy_(kv, non_blocking=True)
        return host, moved

    def to_device(self, kv: torch.Tensor) -> tuple[torch.Tensor, Moved]:
        """A device copy of ``kv``; asynchronous from pinned host memory."""
        if kv.is_cuda or self.side is None or not kv.is_pinned():
            return kv.to(self.device).contiguous(), Moved()
        out = torch.empty(kv.shape, dtype=kv.dtype, device=self.device)
        with self._on_side(out) as moved:
            out.copy_(kv, non_blocking=True)
        return out, moved

    def copy_pairs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Moved:
        """Queues ``dst.copy_(src)`` for each ``(src, dst)`` pair, in order (pages between the pools)."""
        if self.side is None or not any(t.is_cuda for pair in pairs for t in pair):
            for src, dst in pairs:
                dst.copy_(src)
            return Moved()
        with self._on_side() as moved:
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
        return moved

    def gather(self, slabs: list[torch.Tensor], out: torch.Tensor, first_token: int, *, batched: bool):
        """Queues ``slabs`` into ``out[:, :, first_token:]`` back to back; returns ``(end offset, Moved)``.

        ``batched``: one slab-gather launch reading pinned host and device memory in place; otherwise one copy
        per slab (the page-by-page path).
        """
        if self.side is None or not out.is_cuda:
            return gather_slabs_reference(slabs, out, first_token), Moved()
        with self._on_side(out, timed=True) as moved:
            # The timing starts before the host builds the kernel's address table, as it starts before the first
            # per-slab copy is issued: both paths are timed with their host work.
            if batched:
                end = gather_slabs(slabs, out, first_token, on_launch=moved.started.record)
            else:
                moved.started.record()
                end = gather_slabs_reference(slabs, out, first_token)
        return end, moved

    def stage(self, srcs: list[torch.Tensor], dsts: list[torch.Tensor], *, batched: bool) -> Moved:
        """Queues ``dsts[i].copy_(srcs[i])`` (page slabs into device pages), timed on the side stream.

        ``batched``: one slab-copy launch reading pinned host and device memory in place; otherwise one copy per
        slab (the ReKV-style path).
        """
        if self.side is None or not dsts or not dsts[0].is_cuda:
            for src, dst in zip(srcs, dsts, strict=True):
                dst.copy_(src)
            return Moved()
        with self._on_side(timed=True) as moved:
            if batched:
                copy_slabs(srcs, dsts, on_launch=moved.started.record)
            else:
                moved.started.record()
                for src, dst in zip(srcs, dsts, strict=True):
                    dst.copy_(src, non_blocking=True)
        return moved

    def mark(self) -> torch.cuda.Event | None:
        """A timing event recorded on the side stream now: where a move's host preparation begins."""
        if self.side is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.side)
        return event

    def stage_layers(
        self, rows: np.ndarray, upload, num_heads: int, head_dim: int, dtype: torch.dtype, *, started=None
    ) -> list[Moved]:
        """Queues the slab copies of several layers, ``rows[i]`` (``[num_slabs, 5]``, the address table
        ``copy_slabs`` builds) being layer i's, from one upload of the whole table: one launch per layer, so each
        layer's ``Moved`` passes as soon as its own slabs have landed.

        Timed as one span: the first layer's starts at ``started`` (``mark``, taken before the rows were built)
        or now, each later layer's where the one before it ended, so the layers' ``seconds`` add up to the whole
        move with its host preparation.
        """
        if self.side is None:
            for layer_rows in rows:
                copy_slab_table_reference(layer_rows, num_heads, head_dim, dtype.itemsize)
            return [Moved() for _ in rows]
        started = started or self.mark()
        table = upload(rows.reshape(-1, 5))
        longest, per_layer = int(rows[:, :, 2].max(initial=0)), rows.shape[1]
        launches = [
            lambda i=i: copy_slab_table(table[i * per_layer : (i + 1) * per_layer], longest, num_heads, head_dim, dtype)
            for i in range(rows.shape[0])
        ]
        return self._timed_chain(launches, started, table)

    def copy_runs(self, groups: list[np.ndarray], *, started=None, streams: int = 1, batch: bool = True) -> list[Moved]:
        """Queues each group of byte runs (``PagePools.block_rows``) on the copy engines, one ``Moved`` per group
        (each passes once its own runs have landed); timed as one span like ``stage_layers``. With ``batch``, each
        stream's runs of a group go in one ``cudaMemcpyBatchAsync`` call where the runtime has it (``_copy``).

        With ``streams`` above one, a group's runs are dealt round-robin to the side stream and ``streams - 1``
        helper streams, which start behind the side stream and which it waits for before the group's ``Moved``
        passes: more copies in flight at once, in the same order with every other move."""
        if self.side is None:
            for runs in groups:
                cudart.copy_runs_reference(runs)
            return [Moved() for _ in groups]
        helpers = self._helpers(streams - 1)
        batch = batch and not self._batch_refused and cudart.batch_available()
        launches = [lambda runs=runs: self._deal(runs, helpers, batch) for runs in groups]
        return self._timed_chain(launches, started or self.mark())

    def _copy(self, runs: np.ndarray, stream: int, batch: bool) -> None:
        """One stream's runs: in one batched call, or one call a run. A batched call the runtime refuses is made
        again a call a run (copying a run twice writes the same bytes), and batching stops for this engine."""
        if batch and not self._batch_refused:
            try:
                cudart.copy_batch(runs, stream)
                return
            except RuntimeError as err:
                self._batch_refused = True
                log.warning("batched staging copies refused (%s); copying a run a call from now on", err)
        cudart.copy_runs(runs, stream)

    def _helpers(self, count: int) -> list[torch.cuda.Stream]:
        while len(self._helper_streams) < count:
            self._helper_streams.append(torch.cuda.Stream(self.device))
        return self._helper_streams[:count]

    def _deal(self, runs: np.ndarray, helpers: list[torch.cuda.Stream], batch: bool) -> None:
        """``runs`` on the side stream and ``helpers`` round-robin; the side stream ends behind all of them."""
        if not helpers:
            self._copy(runs, self.side.cuda_stream, batch)
            return
        share = len(helpers) + 1
        for helper in helpers:
            helper.wait_stream(self.side)
        self._copy(runs[0::share], self.side.cuda_stream, batch)
        for i, helper in enumerate(helpers, start=1):
            self._copy(runs[i::share], helper.cuda_stream, batch)
        for helper in helpers:
            self.side.wait_stream(helper)

    def _timed_chain(self, launches: list, started: torch.cuda.Event, *used: torch.Tensor) -> list[Moved]:
        """Queues each launch as a move of its own on the side stream, timed from where the one before it ended
        (the first from ``started``), so the moves' ``seconds`` add up to the whole span."""
        moves = []
        for launch in launches:
            with self._on_side(*used, timed=True) as moved:
                moved.started = started
                moved.issued = torch.cuda.Event(enable_timing=True)
                moved.issued.record()
                launch()
            started = moved.ready
            moves.append(moved)
        return moves

    def fence(self) -> torch.cuda.Event | None:
        """An event that passes once every move queued so far has run (None off CUDA)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait(self, moved: Moved) -> None:
        """The current (compute) stream waits for a move, without stopping the host."""
        if moved.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(moved.ready)

    @contextmanager
    def _on_side(self, *used: torch.Tensor, timed: bool = False) -> Iterator[Moved]:
        assert self.side is not None
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        moved = Moved(ready=torch.cuda.Event(enable_timing=timed))
        if timed:
            moved.started = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.side):
            yield moved
            moved.ready.record()
        for tensor in used:
            tensor.record_stream(self.side)
