"""Decode steps read from fixed buffers, batched across questions, and replayed from CUDA graphs.

At the 7B shape one eager decode step launches about 930 kernels from Python. On the H200 their GPU work is about
6 ms, while the step took 25-48 ms (``mosaic bench profile``). A CUDA graph replays the same kernels with one
launch: 7.4-8.4 ms a step there (``bench/NOTES.md``, session 6). A step's cost is mostly reading the weights, so
the questions running at once step together, as rows of one batch.

A graph bakes in every tensor address and shape it was captured with, so a step reads everything that changes
from fixed buffers (``FixedDecodePlan``), one row per question:

- ``tables[t, b]``: slot table t of row b's question: sink + window, retrieved units and the question's own
  slots, as ``QuestionPlan`` built it, -1 padded to the width. In cluster and frame mode every layer after the
  retriever's anchor reads the anchor's table, so they share its buffer: 2 buffers (layers 0 and 1), not 28
  (at 16 rows of 22,528 slots, about 3 MB against 40);
- ``static[t, b]``: how many of those slots come before the question's own;
- ``question_slots[b]``: the slots of the question and answer tokens, in order;
- ``inputs[b]``: the token id, its text position and how many question and answer tokens are written already.

Row b writes its token's KV of layer l at ``question_slots[b, filled]`` and attends to the first
``static[t, b] + filled + 1`` slots of ``tables[t, b]``, t being layer l's table: exactly what
``QuestionPlan.attend`` does with a table it slices on the host. Only ``inputs`` changes from step to step while
the same questions step together; a row is loaded again when another question takes it.

Batching (``DecodeGraphs``): a question offers its next input when it emits a token, before its reader asks for
the next one. The first question asked to step runs one step for every question that has offered, and the others
find their next token ready. So the service's engine loop, which steps its running answers in turn, steps them
all at once, and a question joins or leaves the batch between steps.

One graph is kept per table layout, batch size (up to ``MAX_BATCH``) and table width (``graph_width``: the widest
table any question of the stream can build, rounded up to ``WIDTH_STEP``, so a young stream's questions and an old
one's replay the same graphs, the ones the engine's warm-up made). Graphs are captured on first use and dropped
when the device pool is replaced (full mode grows it, also while an answer decodes, since ingest goes on
meanwhile). Questions that measure recall, re-score clusters while decoding, or run
on the CPU decode eagerly, one at a time.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from mosaic_core.engine.attend import attend_paged
from mosaic_core.engine.graph_capture import GraphPool

log = logging.getLogger(__name__)
WIDTH_STEP = 2048  # table widths are rounded up to this, so a few graphs serve every question
MAX_BATCH = 16  # questions stepped together at most


def graph_width(plan, slots: int) -> int:
    """The width of the tables a graph replaying ``plan`` reads: ``slots`` or, if more, the widest table any question
    of its stream can build (``QuestionPlan.widest_tokens``), rounded up to ``WIDTH_STEP``.

    Not the question's own width: a stream's tables widen as its window fills and its history passes the retrieval
    budget, and each new width took a capture, and compiled attention kernels for its split count, in the first
    questions users asked (538 ms TTFT p99 at 32 cameras on an H100, bench/NOTES.md, session 40). The widest table
    still depends on the stream's sink, so a stream with a longer system prompt than the warm-up's scratch stream
    may need graphs of its own. Slots past a question's own are -1, and a split of the attention's keys that starts
    past its row's length reads none of them: it only writes an empty partial for the merge.
    """
    return -(-max(slots, plan.widest_tokens) // WIDTH_STEP) * WIDTH_STEP


class FixedDecodePlan:
    """The attention plan of a batched decode step whose every input sits in a buffer that outlives the step."""

    def __init__(self, pools, table_of_layer: tuple[int, ...], batch: int, width: int, device: torch.device) -> None:
        self.pools = pools
        self.width = width
        self.table_of_layer = table_of_layer  # layer -> the layer whose table (and buffer) it reads: 0, 1, ...
        num_tables = max(table_of_layer) + 1
        self.tables = torch.full((num_tables, batch, width), -1, dtype=torch.int32, device=device)
        self.static = torch.zeros((num_tables, batch), dtype=torch.int32, device=device)
        self.question_slots = torch.zeros((batch, width), dtype=torch.int64, device=device)
        self.inputs = torch.zeros((batch, 3), dtype=torch.int64, device=device)  # token id, position, filled
        self._staged = torch.zeros((batch, 3), dtype=torch.int64, pin_memory=device.type == "cuda")
        self._rows: list[weakref.ref | None] = [None] * batch  # the question plan whose tables each row holds
        # Set once per step by ``prepare`` (every layer writes and reads the same slots):
        self._write_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv_lens: torch.Tensor | None = None

    def load(self, plans: list) -> None:
        """Makes row b hold ``plans[b]``'s tables and slots, copying in only the rows that change."""
        for b, plan in enumerate(plans):
            held = self._rows[b]
            if held is not None and held() is plan:
                continue
            self.tables[:, b].fill_(-1)
            for layer in range(self.tables.shape[0]):
                table = plan.tables[layer]
                self.tables[layer, b, : table.shape[1]] = table[0]
            static = plan.static_tokens[: self.tables.shape[0]]
            self.static[:, b].copy_(self.pools.upload(static, torch.int32))
            slots = self.pools.upload(np.asarray(plan.question_slots_np, dtype=np.int64))
            self.question_slots[b, : len(slots)].copy_(slots)
            self._rows[b] = weakref.ref(plan)

    def set_inputs(self, rows: list[tuple[int, int, int]]) -> None:
        """Each row's (token id, text position, tokens filled)."""
        self._staged.numpy()[:] = rows  # the last step's token ids were read back, so its copy has run
        self.inputs.copy_(self._staged, non_blocking=True)

    def prepare(self) -> None:
        """Where each row's token goes and how many slots it reads, once per step for every layer."""
        filled = self.inputs[:, 2:3]
        slot = self.question_slots.gather(1, filled)[:, 0]
        page_tokens = self.pools.page_tokens
        self._write_index = (slot // page_tokens, slot % page_tokens)
        self._kv_lens = self.static + filled[:, 0].to(torch.int32) + 1  # [tables, batch]

    def attend(self, layer_idx, query, key, value, scale):
        self.pools.write_slots(layer_idx, self._write_index, torch.stack([key[:, :, 0], value[:, :, 0]], 1))
        k_pages, v_pages = self.pools.layer_pages(layer_idx)
        i = self.table_of_layer[layer_idx]
        return attend_paged(query, k_pages, v_pages, self.tables[i], self._kv_lens[i], scale)


def _table_layout(plan) -> tuple[int, ...]:
    """For each layer, the layer whose table buffer it reads: the retriever's anchor for every layer after it when
    they all read the anchor's table (cluster and frame mode), each layer its own otherwise. The same for every
    question of a mode, whichever of its first layers happen to choose alike, so they all batch together."""
    anchor, num_layers = plan.retriever.prefetch_after_layer, len(plan.tables)
    if anchor is not None and all(plan.tables[layer] is plan.tables[anchor] for layer in range(anchor, num_layers)):
        return tuple(min(layer, anchor) for layer in range(num_layers))
    return tuple(range(num_layers))


def fixed_step(model, fixed: FixedDecodePlan) -> torch.Tensor:
    """One greedy decode step of every row from ``fixed``'s buffers; returns the next token ids ``[batch]``."""
    fixed.prepare()
    batch = fixed.inputs.shape[0]
    input_ids = fixed.inputs[:, 0:1]
    positions = fixed.inputs[:, 1:2].view(1, batch, 1).expand(3, batch, 1)
    hidden = model.decode_forward(input_ids=input_ids, position_ids=positions, plan=fixed)
    return model.logits(hidden[:, -1]).argmax(-1)


class DecodeGraphs:
    """Batched decode steps from CUDA graphs, one per table layout, batch size and table width (module doc).

    Args:
        model: the engine's adapter (``decode_forward``, ``logits``).
        pools: the engine's page pools.
        num_layers: decoder layers.
        enabled: capture graphs (CUDA only); otherwise ``start`` refuses and questions decode eagerly.
        capture: False runs the fixed-buffer step eagerly instead of replaying it (tests compare it on the CPU).
    """

    def __init__(self, model, pools, num_layers: int, *, enabled: bool, capture: bool = True) -> None:
        self.model = model
        self.pools = pools
        self.num_layers = num_layers
        self.capture = capture
        self.enabled = enabled and (model.device.type == "cuda" or not capture)
        self.max_batch = MAX_BATCH  # questions stepped together at most (1: one at a time, for comparisons)
        self.num_steps = 0  # batched steps run from fixed buffers (replayed, or eager with capture off)
        self.num_rows = 0  # question steps in them
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, FixedDecodePlan, torch.Tensor | None]]
        self._graphs = {}
        self._offered: dict[int, tuple[object, int, int]] = {}  # id(plan) -> (plan, token id, position)
        self._ready: dict[int, int] = {}  # id(plan) -> its next token id, stepped with another question
        self._joined: dict[int, int] = {}  # id(plan) -> when its answer started decoding from fixed buffers
        self._arrivals = 0
        self._layouts: dict[int, tuple[int, ...]] = {}  # id(plan) -> which layers share its tables
        self._pool_tensor = None  # the device pool the graphs read; another one invalidates them
        self.graph_pool = GraphPool("decode steps")  # off for good after a failed capture

    def start(self, plan) -> bool:
        """Whether ``plan``'s answer can decode from fixed buffers; if not, it decodes eagerly."""
        if not self.enabled or plan.recall_probe is not None or plan.rescore_every_tokens > 0:
            return False
        if any(table is None for table in plan.tables):
            return False
        self._arrivals += 1
        self._joined[id(plan)] = self._arrivals
        self._layouts[id(plan)] = _table_layout(plan)
        return True

    def offer(self, plan, token_id: int, position: int) -> None:
        """``plan``'s next step takes ``token_id`` at text ``position``: any question's step may run it."""
        self._offered[id(plan)] = (plan, token_id, position)

    def leave(self, plan) -> None:
        """``plan``'s answer ended or was abandoned: no step runs it again, and its pages may go."""
        self._offered.pop(id(plan), None)
        self._ready.pop(id(plan), None)
        self._joined.pop(id(plan), None)
        self._layouts.pop(id(plan), None)

    def step(self, plan) -> int | None:
        """``plan``'s next token id, after ``offer``. Runs one step for every question offered, unless another
        question's step already ran this one. None: no graph could be captured, so ``plan`` decodes eagerly."""
        key = id(plan)
        if key in self._ready:
            return self._ready.pop(key)
        if not self.enabled:
            self.leave(plan)
            return None
        # The oldest questions first, so a row keeps its question from step to step whoever asks first. A batch
        # holds questions whose layers share tables alike (in one mode, all of them).
        layout = self._layouts[key]
        alike = (k for k in self._offered if k != key and self._layouts[k] == layout)
        others = sorted(alike, key=self._joined.__getitem__)[: self.max_batch - 1]
        rows = [self._offered[k] for k in sorted([key, *others], key=self._joined.__getitem__)]
        plans = [row[0] for row in rows]
        entry = self._entry(plans, rows, layout)
        if entry is None:
            self.leave(plan)
            return None
        graph, fixed, next_ids = entry
        fixed.load(plans)
        fixed.set_inputs([(token, position, p.filled_tokens) for p, token, position in rows])
        if graph is None:
            next_ids = fixed_step(self.model, fixed)
        else:
            graph.replay()
        for p in plans:
            p.filled_tokens += 1
            p.steps += 1
            del self._offered[id(p)]
        self.num_steps += 1
        self.num_rows += len(plans)
        for p, next_id in zip(plans, next_ids.tolist(), strict=True):
            self._ready[id(p)] = next_id
        return self._ready.pop(key)

    def _entry(self, plans: list, rows: list, layout: tuple[int, ...]):
        if self.pools.device_pool is not self._pool_tensor:  # full mode grew it, maybe mid-answer
            self._graphs.clear()
            self._pool_tensor = self.pools.device_pool
        width = max(graph_width(p, max(int(t.shape[1]) for t in p.tables)) for p in plans)
        key = (layout, len(plans), width)
        if key not in self._graphs:
            entry = self._prepare(plans, rows, *key)
            if entry is None:
                return None
            self._graphs[key] = entry
        return self._graphs[key]

    def _prepare(self, plans: list, rows: list, layout: tuple[int, ...], batch: int, width: int):
        fixed = FixedDecodePlan(self.pools, layout, batch, width, self.model.device)
        if not self.capture:
            return None, fixed, None
        # The warm-up runs the step itself (compiling kernels): it writes each row's KV where the step will.
        fixed.load(plans)
        fixed.set_inputs([(token, position, p.filled_tokens) for p, token, position in rows])
        captured = self.graph_pool.capture(lambda: fixed_step(self.model, fixed))
        if captured is None:
            self.enabled = False
            return None
        graph, next_ids = captured
        log.info(
            "captured the decode step of %d questions over %d-slot tables (%d graphs)", batch, width, len(self._graphs)
        )
        return graph, fixed, next_ids
