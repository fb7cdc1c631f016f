"""Attention plans: what each layer attends to during one forward pass, and what it keeps.

- ``IngestPlan``: a batch of rows, one frame (or the preamble) of one stream each. Each row attends to its
  stream's sink + local window + itself; the new KV is written into the device pages taken for the row.
- ``QuestionPlan``: one stream's question and then its answer, token by token. Each layer attends to
  sink + retrieved clusters + local window + the question and answer so far. Clusters are chosen when the question
  is prefilled and, if configured, again every ``rescore_every_tokens`` decode steps. A layer's retrieved KV that
  is not on the device is staged on the transfer engine's side stream; the layer waits for its own staging only,
  right before it attends.

Both read the KV in place, through slot tables over the arena's device pool (``mosaic_core.memory.arena``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.engine.attend import attend_paged
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.recall_probe import RecallProbe
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.selection import LayerSelection
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import DeviceRoom
from mosaic_core.kernels import cdiv
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import NOTHING_PENDING, Moved


class IngestPlan:
    """Bounded attention for a batch of streams: the cost per frame is independent of stream length.

    Each row's new KV is written straight into the device pages taken for it, then the row attends, in place,
    to its stream's sink + local window + itself through one slot table:

        row b:  [ sink + window slots of stream b | slots of the row's new pages ]   (-1 padded to the widest row)

    A row with fewer new tokens than the pass's ``width`` (default: the most any row has) is left-padded: its
    pad tokens' KV is not written. With ``pauses``, the pass stops before every few layers for its caller
    (``mosaic_core.engine.ingest_pauses``).
    """

    def __init__(
        self,
        streams: list[StreamState],
        spec: KVSpec,
        pools: PagePools,
        new_pages: list[list[int]],
        new_fills: list[list[int]],
        *,
        width: int | None = None,
        pauses: IngestPauses | None = None,
    ) -> None:
        self.streams = streams
        self.pauses = pauses
        self.spec = spec
        self.pools = pools
        rows, new = [], []
        for stream, pages, fills in zip(streams, new_pages, new_fills, strict=True):
            own = pools.slots(pages, fills)
            rows.append(np.concatenate([stream.past_slots(), own]))
            new.append(own)
        self.attended_tokens = [len(row) for row in rows]
        # -1 padded to a multiple of 16 slots: Triton compiles a kernel variant for each divisibility of the table's
        # width, which changes as windows fill, and each new one held the engine thread for about a second.
        table = np.full((len(rows), cdiv(max(self.attended_tokens), 16) * 16), -1, dtype=np.int32)
        for b, row in enumerate(rows):
            table[b, : len(row)] = row
        self.table = pools.upload(table, torch.int32)
        self.kv_lens = pools.upload(self.attended_tokens, torch.int32)
        self.new_index = pools.slot_index(np.concatenate(new))
        width = width or max(len(own) for own in new)
        pads = [width - len(own) for own in new]
        self.real_tokens = None  # rows of the flattened [B * width] new KV that are not pad, when some are
        if any(pads):
            real = np.concatenate(
                [b * width + pad + np.arange(len(own)) for b, (pad, own) in enumerate(zip(pads, new, strict=True))]
            )
            self.real_tokens = pools.upload(real, torch.int64)

    def attend(self, layer_idx, query, key, value, scale):
        if self.pauses is not None:
            self.pauses.before_layer(layer_idx, query.device)
        batch, heads, tokens, head_dim = key.shape
        kv = torch.stack([key, value], dim=2).transpose(1, 3).reshape(batch * tokens, 2, heads, head_dim)
        if self.real_tokens is not None:
            kv = kv.index_select(0, self.real_tokens)
        self.pools.write_slots(layer_idx, self.new_index, kv)
        k_pages, v_pages = self.pools.layer_pages(layer_idx)
        return attend_paged(query, k_pages, v_pages, self.table, self.kv_lens, scale)


class QuestionPlan:
    """Retrieval-augmented attention for one question and its answer, read in place from the device pool.

    Each layer attends through one slot table:

        [ sink + local window | retrieved: resident units' own pages, staged pages | question + answer so far ]
          the stream's pages,    read where they are       pages this question took   pages this question took
          held for the question

    Units that are not on the device are staged: the layer's slabs of their pages are copied, in one launch per
    layer, into device pages the question took inside the device budget. Nothing else is copied: the question's
    and answer's KV is written once, into the question's pages, and a decode step only widens the table's view by
    its own token. When the retriever shares one layer's choice with all later layers, their stagings are queued
    as soon as that layer has chosen, so layer l+1's units move while layer l computes; they share one table.
    """

    def __init__(
        self,
        stream: StreamState,
        retriever: Retriever,
        *,
        rescore_every_tokens: int,
        capacity_tokens: int,
        room: DeviceRoom,
        widest_tokens: int = 0,
        recall_probe: RecallProbe | None = None,
        plant_queries: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.stream = stream
        self.retriever = retriever
        self.rescore_every_tokens = rescore_every_tokens
        self.capacity_tokens = capacity_tokens
        # The most slots a table of any question on this stream can hold: what graphs size their tables to
        # (``decode_graphs.graph_width``), so that this question's width does not make graphs of its own.
        self.widest_tokens = widest_tokens
        self.recall_probe = recall_probe
        # Measurement only (mosaic_core.engine.probes): replaces the question's queries at its prefill.
        self.plant_queries = plant_queries
        self.room = room
        self.pools = pools = retriever.tiering.tiers.pools
        room.hold(stream.past_pages())  # a frame leaving the window meanwhile keeps its page until the answer ends
        self.past_slots = stream.past_slots()
        retriever.sizes_at_snapshot()  # frames that left the window since the question are in their clusters
        question_fills = pages_for(capacity_tokens, pools.page_tokens)
        self.question_pages = room.take(len(question_fills))
        self.question_slots_np = pools.slots(self.question_pages, question_fills)
        self.staging: list[int] = []  # device pages that staged units land in (each layer its own layer of them)
        num_layers = retriever.spec.num_layers
        self.selections: list[LayerSelection | None] = [None] * num_layers
        self.tables: list[torch.Tensor | None] = [None] * num_layers  # [1, static + capacity] int32
        self.static_tokens = [0] * num_layers
        self.gathers: list[Moved] = [NOTHING_PENDING] * num_layers
        self.filled_tokens = 0  # question and answer tokens written so far
        self.steps = 0  # forward passes so far: 0 is the question prefill
        self.selection_history: list[list[LayerSelection]] = []
        self.choice_query: tuple[int, torch.Tensor, float] | None = None  # (layer, query, scale) that chose at prefill

    def attend(self, layer_idx, query, key, value, scale):
        if self.plant_queries is not None and self.steps == 0:
            query = self.plant_queries(layer_idx, query)
        if self._should_score():
            self._choose(layer_idx, query[0])
            if self.steps == 0 and layer_idx == self.retriever.prefetch_after_layer:
                self.choice_query = (layer_idx, query[0], scale)
        if self.recall_probe is not None:
            self.recall_probe.observe(layer_idx, query[0], self.selections[layer_idx], step=self.steps)
        self.retriever.tiering.tiers.transfers.wait(self.gathers[layer_idx])
        self.gathers[layer_idx] = NOTHING_PENDING  # waited for once; later decode steps need no wait
        end = self.filled_tokens + key.shape[2]
        assert end <= self.capacity_tokens, f"question plan capacity {self.capacity_tokens} tokens exceeded"
        self._write(layer_idx, torch.stack([key[0], value[0]]))
        k_pages, v_pages = self.pools.layer_pages(layer_idx)
        table = self.tables[layer_idx][:, : self.static_tokens[layer_idx] + end]
        out = attend_paged(query, k_pages, v_pages, table, None, scale)
        if layer_idx == len(self.selections) - 1:
            self.steps += 1
            self.filled_tokens = end
        return out

    def choose_at_prefill(self, layer: int, query: torch.Tensor) -> None:
        """What ``attend`` does at the prefill before a layer attends, for a layer that runs elsewhere
        (``anchor_graphs``): its choice from ``query`` ``[num_q_heads, T, D]`` (the question's real rows), and at
        the anchor every later layer's, with their staging queued."""
        self._choose(layer, query)
        if layer == self.retriever.prefetch_after_layer:
            self.choice_query = (layer, query.clone(), self.retriever.spec.scale)  # the caller's buffer is reused

    def wait_for_gathers(self) -> None:
        """Makes the compute stream wait, without stopping the host, for every staging copy still in flight: those
        the anchor queued for later layers, or a re-score for its own, when the pass stopped before those layers
        ran (it raised). Called before the question's pages go back, so that whatever next writes them on the
        compute stream comes after the copies into them. Nothing is pending after a pass that ran to the end."""
        transfers = self.retriever.tiering.tiers.transfers
        for layer, moved in enumerate(self.gathers):
            if moved is not NOTHING_PENDING:
                transfers.wait(moved)  # a group's layers share one move: waiting on it again costs nothing
                self.gathers[layer] = NOTHING_PENDING

    def _write(self, layer: int, kv: torch.Tensor) -> None:
        """Writes the step's new KV ``[2, H, T, D]`` into the question's pages, which hold its tokens in order:
        one slice copy per page the step touches (one for a decode step)."""
        pt, start = self.pools.page_tokens, 0
        while start < kv.shape[2]:
            page, offset = divmod(self.filled_tokens + start, pt)
            n = min(pt - offset, kv.shape[2] - start)
            self.pools.write_run(layer, self.question_pages[page], offset, kv[:, :, start : start + n])
            start += n

    def _choose(self, layer: int, query: torch.Tensor) -> None:
        anchor, last = self.retriever.prefetch_after_layer, len(self.selections) - 1
        if anchor is not None and layer > anchor:
            return  # chosen, and its staging queued, when the anchor layer ran
        selection = self.retriever.select(layer, query)
        self._rebuild(layer, selection)
        if layer == anchor:
            self._share(layer, selection, range(layer + 1, last + 1))
        if layer in (anchor, last):
            self.selection_history.append(list(self.selections))

    def _share(self, layer: int, selection: LayerSelection, later: range) -> None:
        """Gives the ``later`` layers ``layer``'s choice and table, and stages their slabs into the same pages."""
        shared = (self.tables[layer], self.static_tokens[layer])
        moves = self.retriever.stage_shared(selection, later, self.staging)
        if moves is None:
            for other in later:
                self._rebuild(other, self.retriever.reuse(other, selection), shared)
            return
        reused = selection.shared()
        for other, moved in zip(later, moves, strict=True):
            self.gathers[other] = moved
            self.tables[other], self.static_tokens[other] = shared
            self.selections[other] = reused

    def _rebuild(self, layer: int, selection: LayerSelection, shared: tuple | None = None) -> None:
        fills = selection.staged_fills
        num_staged = len(fills)
        if num_staged > len(self.staging):
            self.staging += self.room.take(num_staged - len(self.staging))
        self.gathers[layer] = self.retriever.stage(selection, layer, self.staging[:num_staged])
        if shared is None and self._same_slots(layer, selection, fills):
            shared = (self.tables[layer - 1], self.static_tokens[layer - 1])  # full mode: every layer
        if shared is None:
            staged = self.pools.slots(self.staging[:num_staged], fills)
            static = np.concatenate([self.past_slots, *selection.device_slots, staged])
            assert len(static) == len(self.past_slots) + selection.num_tokens, "slots and selection disagree"
            table = np.concatenate([static, self.question_slots_np]).astype(np.int32)
            shared = (self.pools.upload(table, torch.int32)[None], len(static))
        self.tables[layer], self.static_tokens[layer] = shared
        self.selections[layer] = selection

    def _same_slots(self, layer: int, selection: LayerSelection, fills: list[int]) -> bool:
        """Whether the previous layer's table reads the same slots: the same units, on the device where they were
        (``device_slots`` hands out the same arrays until a unit's pages change), and staged slabs of the same sizes
        into the same staging pages. Then the table, its host build and its copy to the device are not repeated."""
        if layer == 0 or self.tables[layer - 1] is None:
            return False
        before = self.selections[layer - 1]
        return (
            before.cluster_ids == selection.cluster_ids
            and len(before.device_slots) == len(selection.device_slots)
            and all(a is b for a, b in zip(before.device_slots, selection.device_slots, strict=True))
            and before.staged_fills == fills
        )

    def _should_score(self) -> bool:
        if self.steps == 0:
            return True
        return self.rescore_every_tokens > 0 and self.steps % self.rescore_every_tokens == 0
