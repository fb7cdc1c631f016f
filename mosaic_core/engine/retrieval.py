"""Choosing and fetching the history a question attends to, one layer at a time.

The mode picks the retrieval unit and the machinery (``Machinery``, ``machinery.py``, whose docstring tables the
modes); everything here reads the machinery, never the mode. What a layer chose and what a question staged are
``selection.py``'s (``LayerSelection``, ``TransferPart``), with the budget fill and the cuts of a chosen cluster.

- The gather: device-resident units are attended where they are, through their slots in the device pool. The
  other units' pages move into device pages the question took (inside the device budget). Batched, by default on
  the copy engines, a run of bytes per page and group of layers (``staging_groups``, by default 8, 8, 6 and then 4
  layers a group; a page's layers are one run), each group's runs in one batched call (``staging_batch``), or with
  ``staging_copy="kernel"`` one slab-gather launch per layer that reads pinned host memory from the SMs; ReKV's
  stand-in makes one ``copy_`` per slab.
- The shared choice: with ``prefetch_after_layer`` set, layers up to it score their own queries and every later
  layer takes that layer's choice, so their gathers are queued on the side stream at once and overlap compute.
  With the batched gather a layer's copy table is computed from page numbers (one table for all the later
  layers together, ``stage_shared``), not from a tensor view of every page's slab per layer: a selection names the
  host pages to stage (``host_pages``), which are the same for every layer. Views remain for units on disk and for
  the slab-by-slab copies of ReKV's stand-in.
- The device cache: units are admitted to the device tier, and after the answer the units at least half the
  layers chose are promoted to the device whole, off the question's critical path.

Counting is the same for every mode: ``num_copies`` counts the contiguous host slabs moved (one per page and
layer of a unit that was not on the device), whatever moved them. ``bytes_fetched`` counts the filled tokens,
except on the copy engines, which copy (and count) every slot of a page, filled or not. The transfer timer starts
before the host prepares the move (building the address table, or issuing the copies) in every path.
``transfer_parts`` splits it: the layers that choose (each staging its own choice while the question waits) and the
later layers (staged at once from the anchor's choice), each also timed as its copies alone (``Moved.copy_seconds``).

Gathers are queued, never waited for here: the plan makes the compute stream wait for a layer's gather right
before that layer attends.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.attend import past_logsumexp
from mosaic_core.engine.machinery import Machinery, layer_groups
from mosaic_core.engine.scorers import scorer_by_name
from mosaic_core.engine.selection import LayerSelection, TransferPart, fill_in_order, first_pages, first_views
from mosaic_core.engine.stage_timer import StageTimer
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import TierManager
from mosaic_core.memory import cudart
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import NOTHING_PENDING, Moved

log = logging.getLogger(__name__)


@functools.cache
def _copy_engines_found() -> bool:
    """Whether the CUDA runtime is there for ``staging_copy="dma"``; asked once per process, with CUDA up (the
    asker has a side stream), and said once when not, since staging then falls back to the slab-gather kernel."""
    if cudart.available():
        return True
    log.warning("staging_copy='dma': no libcudart found in this process, so staging uses the slab-gather kernel")
    return False


class Retriever:
    """Selects units per layer for one question and counts how many layers chose each."""

    def __init__(
        self,
        *,
        machinery: Machinery,
        spec: KVSpec,
        tiering: TierManager,
        stream: StreamState,
        candidates: list[str],
        budget_tokens: int,
        seed: int = 0,
        profile: bool = False,
    ) -> None:
        self.machinery = machinery
        self.seed = seed
        self.scorer = scorer_by_name(machinery.scorer, seed=seed)
        self.spec = spec
        self.tiering = tiering
        self.stream = stream
        self.candidates = candidates
        self.budget_tokens = budget_tokens
        last, anchor = spec.num_layers - 1, machinery.prefetch_after_layer
        self.prefetch_after_layer = anchor if anchor is not None and anchor < last else None
        self.votes: dict[str, int] = {}  # cluster -> layers that chose it
        self._pinned: set[str] = set()  # units read so far, pinned until ``release``
        # This question's own counts (engine-wide counters also move, but other questions move them too).
        self.bytes_fetched = 0
        self.num_copies = 0
        self.device_hits = 0
        self.device_lookups = 0
        self._timer = StageTimer(profile, tiering.tiers.transfers)  # ``stage_seconds``
        # The centroids and variances of every layer that chooses, at once: [C, layers, num_kv_heads, head_dim]. With
        # an anchor only the layers up to it choose (later ones share its choice).
        self._summaries = None
        self._size_list: list[int] = []  # the candidates' token counts, in their order
        self._smallest = 0
        if candidates:
            choosing = None if self.prefetch_after_layer is None else self.prefetch_after_layer + 1
            self._size_list, self._summaries = tiering.summaries.counts_and_all_layers(candidates, choosing)
            self._smallest = min(self._size_list)
        self._timed_gathers: list[tuple[str, int, int, Moved]] = []  # (part, bytes, copies, move): ``transfer_parts``
        self._generation = tiering.residency.generation  # clusters removed since: ``_gone_indices``
        self._window = self._window_key()  # frames that left the window since: ``sizes_at_snapshot``
        self._snapshot_sizes: dict[str, int] | None = None
        self._cut_slots: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # cluster -> (its slots, their first part)
        self._past_table: torch.Tensor | None = None  # ``past_logsumexp``'s slot table, uploaded once
        off_cuda = tiering.tiers.transfers.side is None  # there the copy engines' copies are plain host copies
        self._dma = machinery.staging_copy == "dma" and (off_cuda or _copy_engines_found())

    def select(self, layer: int, query: torch.Tensor) -> LayerSelection:
        """Scores the candidates with ``query`` ``[num_q_heads, T, D]``; the chosen slabs are not moved yet."""
        if not self.candidates:
            return LayerSelection([], [], [], 0)
        start = self._timer.mark(query.device)
        mean, var, log_count = self._summaries
        past = self.past_logsumexp(layer, query) if self.scorer.needs_past else None
        scores = self.scorer.scores(
            query, mean[:, layer], var[:, layer], log_count, scale=self.spec.scale, past_lse=past
        )
        chosen = self._still_held(self.candidates) if self.machinery.choose_all else self.fill_budget(scores)
        tiers = self.tiering.tiers
        paged = self.machinery.batched_gather and all(
            self.tiering.residency.tier_of(cid) in (Tier.DEVICE, Tier.HOST) for cid in chosen
        )
        selection = LayerSelection(chosen, [], [], 0, scores, paged=paged)
        sizes = self._sizes_to_read()
        for cluster_id in chosen:
            tier = self._take(cluster_id)
            held = None if sizes is None else sizes[cluster_id]
            if tier is Tier.DEVICE:
                selection.device_slots.append(self._device_slots(cluster_id, held))
            elif paged:
                pages, fills = first_pages(*tiers.host_pages(cluster_id), held)
                selection.host_pages += pages
                selection.host_fills += fills
            else:
                selection.slabs += first_views(tiers.layer_slabs(cluster_id, layer), held)
        self._timer.add("score", start, self._timer.mark(query.device))
        selection.num_tokens = sum(len(s) for s in selection.device_slots) + sum(selection.staged_fills)
        return selection

    def reuse(self, layer: int, chosen: LayerSelection) -> LayerSelection:
        """Layer ``layer``'s share of the clusters another layer chose (no scoring of its own); the device slots
        and host pages are the same for every layer."""
        reused = chosen.shared()
        sizes = self._sizes_to_read()
        for cluster_id in chosen.cluster_ids:
            if self._take(cluster_id) is not Tier.DEVICE and not chosen.paged:
                held = None if sizes is None else sizes[cluster_id]
                reused.slabs += first_views(self.tiering.tiers.layer_slabs(cluster_id, layer), held)
        return reused

    def stage(self, selection: LayerSelection, layer: int, staging: list[int]) -> Moved:
        """Queues the selection's pages of ``layer`` into the device pages ``staging`` (in order, as many as
        ``staged_fills``); returns the move to wait for before the layer attends.

        A paged selection goes as ``_stage_pages`` moves it. Otherwise, with the batched gather, every slab of the
        layer moves in one kernel launch that reads pinned host memory in place (on CUDA); without it (the ReKV
        baseline) one copy per slab. Either way the copies counted are the host slabs moved.
        """
        anchor = self.prefetch_after_layer
        part = "shared" if anchor is not None and layer > anchor else "choosing"
        if selection.paged:
            layers = range(layer, layer + 1)
            return self._stage_pages(selection.host_pages, selection.host_fills, staging, layers, part=part)[0]
        if not selection.slabs:
            return NOTHING_PENDING
        pools = self.tiering.tiers.pools
        fills = selection.staged_fills
        pages = [pools.layer_slab(Tier.DEVICE, p, layer, f) for p, f in zip(staging, fills, strict=True)]
        start = self._timer.mark(pages[0].device)
        host = selection.slabs
        batched = self.machinery.batched_gather and pages[0].is_cuda and all(s.is_pinned() for s in host)
        moved = self.tiering.tiers.transfers.stage(host, pages, batched=batched)
        num_bytes = sum(slab.numel() * slab.element_size() for slab in host)
        self.tiering.tiers.stats.record(Tier.HOST, Tier.DEVICE, num_bytes, len(host))
        self.bytes_fetched += num_bytes
        self.num_copies += len(host)
        self._timed_gathers.append((part, num_bytes, 1 if batched else len(host), moved))
        self._timer.add("fetch", start, self._timer.mark(pages[0].device, on_side=True))
        return moved

    def stage_shared(self, chosen: LayerSelection, layers: range, staging: list[int]) -> list[Moved] | None:
        """``reuse`` and ``stage`` for every layer of ``layers`` at once, into the same ``staging`` pages the
        choosing layer's pages went to, each layer into its own layer of them; returns each layer's move.

        The copy table is computed from page numbers for all layers together and moved with one upload, where the
        layer-by-layer path builds a tensor view of every page's slab: at 60 minutes that was about 2,600 views and
        pinned-memory checks per question, host time every question paid before its later layers could run.
        None: the choice is not paged (a chosen unit is on disk, or the machinery copies slab by slab, as ReKV's
        stand-in does), so the layers go one by one (``reuse``, ``stage``).
        """
        if not chosen.paged:
            return None
        for cluster_id in chosen.cluster_ids:  # what ``reuse`` counts, per layer
            self.votes[cluster_id] = self.votes.get(cluster_id, 0) + len(layers)
        return self._stage_pages(chosen.host_pages, chosen.host_fills, staging, layers, part="shared")

    def _stage_pages(
        self, host_pages: list[int], fills: list[int], staging: list[int], layers: range, *, part: str
    ) -> list[Moved]:
        """Queues ``layers`` of ``host_pages`` into the same layers of device pages ``staging``: on the copy engines,
        one run per page and group of layers (``Machinery.staging_groups``); or from one slab-copy table, one kernel
        launch per layer. Returns each layer's move; ``part`` names the moves in ``transfer_parts``."""
        if not host_pages:
            return [NOTHING_PENDING] * len(layers)
        start = self._timer.mark(self.tiering.tiers.pools.device)
        pools, spec, transfers = self.tiering.tiers.pools, self.spec, self.tiering.tiers.transfers
        marked = transfers.mark()  # the timer starts before the host builds the table, as in ``stage``
        dst_pages = staging[: len(host_pages)]
        if self._dma:
            groups = layer_groups(layers, self.machinery.staging_groups)
            runs = pools.group_rows(Tier.HOST, host_pages, dst_pages, groups)
            timed = transfers.copy_runs(
                runs, started=marked, streams=self.machinery.staging_streams, batch=self.machinery.staging_batch
            )
            moves = [moved for group, moved in zip(groups, timed, strict=True) for _ in group]
            timed_bytes = [int(r[:, 2].sum()) for r in runs]  # whole pages: every slot, filled or not
            timed_copies = [len(r) for r in runs]
        else:
            rows = pools.stage_rows(Tier.HOST, host_pages, fills, dst_pages, layers)
            moves = transfers.stage_layers(
                rows, pools.upload, spec.num_kv_heads, spec.head_dim, spec.dtype, started=marked
            )  # fmt: skip
            timed = moves
            timed_bytes = [sum(fills) * spec.bytes_per_token_layer] * len(layers)
            timed_copies = [1] * len(layers)  # a launch a layer
        num_bytes = sum(timed_bytes)
        self.tiering.tiers.stats.record(Tier.HOST, Tier.DEVICE, num_bytes, len(host_pages) * len(layers))
        self.bytes_fetched += num_bytes
        self.num_copies += len(host_pages) * len(layers)
        self._timed_gathers += list(zip([part] * len(timed), timed_bytes, timed_copies, timed, strict=True))
        self._timer.add("fetch", start, self._timer.mark(self.tiering.tiers.pools.device, on_side=True))
        return moves

    def transfer_parts(self) -> dict[str, TransferPart]:
        """The timed gathers by part: ``choosing`` (a layer that chose staging its own choice: the anchor and the
        layers before it, or every layer without an anchor) and ``shared`` (the later layers' groups, staged at
        once from the anchor's choice). Waits for the copies to finish; no seconds off CUDA."""
        parts: dict[str, TransferPart] = {}
        for part, num_bytes, copies, moved in self._timed_gathers:
            total = parts.setdefault(part, TransferPart())
            total.bytes += num_bytes
            total.copies += copies
            total.seconds += moved.seconds()
            total.copy_seconds += moved.copy_seconds()
        return parts

    def release(self) -> None:
        """Unpins every unit this question read (once; the question is over or was abandoned)."""
        for cluster_id in self._pinned:
            self.tiering.residency.unpin(cluster_id)
        self._pinned.clear()

    def promote(self) -> list[str]:
        """After the answer: caches on the device the units that at least half of the layers chose."""
        if not self.machinery.device_cache or not self.votes:
            return []
        num_layers = self.spec.num_layers
        wanted = [cid for cid, n in sorted(self.votes.items(), key=lambda kv: -kv[1]) if 2 * n >= num_layers]
        for cluster_id in self.votes:
            self.tiering.residency.touch(cluster_id, retrieved=True)
        return self.tiering.promote(wanted, keep=frozenset(self.votes))

    @property
    def summaries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Centroids, variances ``[C, layers, num_kv_heads, head_dim]`` and log-counts ``[C]`` of the candidates
        (None without candidates), for the layers that choose: all of them, or with an anchor those up to it."""
        return self._summaries

    def fill_budget(self, scores: torch.Tensor, budget_tokens: int | None = None) -> list[str]:
        """Candidates in descending ``scores`` order, each taken while it still fits the token budget (the
        question's, unless ``budget_tokens`` names another, as the fidelity probes do)."""
        budget = self.budget_tokens if budget_tokens is None else budget_tokens
        order = torch.argsort(scores, descending=True).tolist()
        gone = self._gone_indices()
        return [self.candidates[i] for i in fill_in_order(order, self._size_list, budget, self._smallest, gone)]

    def _gone_indices(self) -> set[int]:
        """Candidates no longer tracked: dropped by retention, or merged or split away by another question's
        upkeep, since this question was asked (a re-score between decode steps comes after them). A candidate the
        question chose is pinned and stays."""
        if self.tiering.residency.generation == self._generation:
            return set()
        tracked = self.tiering.residency.tracked_ids()
        return {i for i, cid in enumerate(self.candidates) if cid not in tracked}

    def sizes_at_snapshot(self) -> None:
        """The plan took its snapshot of the window (its first pass, which may come after frames were ingested
        since the question was asked): the candidates' sizes are read again when a frame may have left the window
        in between, since such a frame is in its cluster now and in no snapshot. The budget is cut, and later
        re-scores read each chosen cluster, at these sizes. (The centroids stay as they were asked.)"""
        key = self._window_key()
        if key == self._window or not self.candidates:
            return
        self._window = key
        tracked = self.tiering.residency.tracked_ids()
        live = [cid for cid in self.candidates if cid in tracked]  # merged or dropped since: ``_gone_indices``
        now = dict(zip(live, (row.num_tokens for row in self.tiering.residency.summaries(live)), strict=True))
        self._size_list = [now.get(cid, size) for cid, size in zip(self.candidates, self._size_list, strict=True)]
        self._smallest = min(self._size_list)

    def _window_key(self) -> tuple[int, int]:
        """Changes whenever a frame may have left the stream's window into its cluster: a frame leaves only when
        one is ingested, or when the window is flushed (emptied)."""
        return self.stream.frames_ingested, len(self.stream.local)

    def _sizes_to_read(self) -> dict[str, int] | None:
        """Each candidate's tokens when the plan took its snapshot of the window (``sizes_at_snapshot``); None
        while no frame can have left the window since, so that no cluster of the stream grew (merges and joins make
        new ids, splits only shrink).

        A frame that leaves the window during the answer is appended to its cluster's pages, after those the
        plan's snapshot was taken beside. The plan already reads it through that snapshot (or, ingested after it,
        never saw it), and the budget was cut with the sizes below: so a chosen cluster is read up to its size at
        the snapshot, and a re-score between decode steps neither reads a frame twice nor goes past the budget
        (``fixed_buffers.load_table``)."""
        if self._snapshot_sizes is None:
            if self._window_key() == self._window:
                return None
            self._snapshot_sizes = dict(zip(self.candidates, self._size_list, strict=True))
        return self._snapshot_sizes

    def _device_slots(self, cluster_id: str, held: int | None) -> np.ndarray:
        """The cluster's slots in the device pool, its first ``held`` only; the same array for every layer while
        its pages stay (``_same_slots`` in the plan compares by identity)."""
        slots = self.tiering.tiers.device_slots(cluster_id)
        if held is None or held >= len(slots):
            return slots
        cut = self._cut_slots.get(cluster_id)
        if cut is None or cut[0] is not slots or len(cut[1]) != held:
            cut = self._cut_slots[cluster_id] = (slots, slots[:held])
        return cut[1]

    def _still_held(self, cluster_ids: list[str]) -> list[str]:
        gone = self._gone_indices()
        return [cid for i, cid in enumerate(cluster_ids) if i not in gone]

    def past_logsumexp(self, layer: int, query: torch.Tensor) -> torch.Tensor | None:
        """Each row of ``query`` ``[num_q_heads, T, head_dim]``: the log-sum-exp of its logits over the stream's
        sink and window keys of ``layer``, ``[num_q_heads, T]``, for a scorer that reads the past
        (``Scorer.needs_past``); None when the stream holds none. The keys are read where they are in the device
        pool, through a slot table uploaded once a question: the plan holds the sink's and window's pages until
        the answer ends."""
        pools = self.tiering.tiers.pools
        if self._past_table is None:
            self._past_table = pools.upload(self.stream.past_slots(), torch.int32).reshape(1, -1)
        if not self._past_table.shape[1]:
            return None
        k_pages, v_pages = pools.layer_pages(layer)
        return past_logsumexp(query, k_pages, v_pages, self._past_table, self.spec.scale)

    def _take(self, cluster_id: str) -> Tier:
        """Pins a chosen unit, counts its lookup and its layer's vote; returns the tier it is read from."""
        if cluster_id not in self._pinned:
            # Pinned until the question ends: maintenance, retention and eviction leave it where it is.
            self.tiering.residency.pin(cluster_id)
            self._pinned.add(cluster_id)
        tier = self.tiering.residency.tier_of(cluster_id)
        on_device = tier is Tier.DEVICE
        # One lookup per unit and question, measured in every mode (ReKV-style blocks live on the host: they miss).
        if cluster_id not in self.votes and not self.machinery.choose_all:
            self.tiering.record_lookup(hit=on_device)
            self.device_lookups += 1
            self.device_hits += on_device
        self.votes[cluster_id] = self.votes.get(cluster_id, 0) + 1
        return tier

    def stage_seconds(self) -> tuple[float, float]:
        """Seconds of scoring and of fetching so far (``StageTimer.seconds``; 0 and 0 without ``profile``)."""
        return self._timer.seconds()
