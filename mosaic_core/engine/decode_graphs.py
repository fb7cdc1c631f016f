"""Decode steps read from fixed buffers, and replayed from CUDA graphs.

At the 7B shape one eager decode step launches about 930 kernels from Python. On the H200 their GPU work is about
6 ms, while the step took 25-48 ms (``mosaic bench profile``). A CUDA graph replays the same kernels with one
launch: 7.4-8.4 ms a step there (``bench/NOTES.md``, session 6).

A graph bakes in every tensor address and shape it was captured with, so a step reads everything that changes
from fixed buffers (``FixedDecodePlan``):

- ``tables[l]``: layer l's slot table, ``[1, width]``: sink + window, retrieved units and the question's own
  slots, as ``QuestionPlan`` built it, -1 padded to the width;
- ``static[l]``: how many of those slots come before the question's own;
- ``question_slots``: the slots of the question and answer tokens, in order;
- ``inputs``: the token id, its text position and how many question and answer tokens are written already.

The step writes the token's KV of layer l at ``question_slots[filled]`` and attends to the first
``static[l] + filled + 1`` slots of ``tables[l]``: exactly what ``QuestionPlan.attend`` does with a table it
slices on the host. Only ``inputs`` changes from step to step; the rest is loaded again when a question steps
after another one of the same width did (questions interleave in the service's engine loop).

One graph is kept per table width (rounded up to ``WIDTH_STEP``), shared by every question that fits it. Graphs
are captured on the first question of each width and dropped when the device pool is replaced (full mode grows
it, also while an answer decodes, since ingest goes on meanwhile). Questions that measure recall, re-score
clusters while decoding, or run on the CPU decode eagerly.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from mosaic_core.engine.attend import attend_paged

log = logging.getLogger(__name__)
WIDTH_STEP = 2048  # table widths are rounded up to this, so a few graphs serve every question


class FixedDecodePlan:
    """The attention plan of a decode step whose every input sits in a buffer that outlives the step."""

    def __init__(self, pools, num_layers: int, width: int, device: torch.device) -> None:
        self.pools = pools
        self.width = width
        self.tables = torch.full((num_layers, 1, width), -1, dtype=torch.int32, device=device)
        self.static = torch.zeros((num_layers, 1), dtype=torch.int32, device=device)
        self.question_slots = torch.zeros(width, dtype=torch.int64, device=device)
        self.inputs = torch.zeros(3, dtype=torch.int64, device=device)  # token id, text position, tokens filled
        self._staged = torch.zeros(3, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._loaded = None  # weak reference to the question plan whose tables and slots the buffers hold

    def load(self, plan) -> None:
        """Copies one question's tables and slots in."""
        self.tables.fill_(-1)
        for layer, table in enumerate(plan.tables):
            self.tables[layer, :, : table.shape[1]].copy_(table)
        static = np.asarray(plan.static_tokens, dtype=np.int32)[:, None]
        self.static.copy_(torch.from_numpy(static))
        slots = torch.from_numpy(np.asarray(plan.question_slots_np, dtype=np.int64))
        self.question_slots[: len(slots)].copy_(slots)
        self._loaded = weakref.ref(plan)

    def holds(self, plan) -> bool:
        return self._loaded is not None and self._loaded() is plan

    def set_inputs(self, token_id: int, position: int, filled: int) -> None:
        self._staged[0], self._staged[1], self._staged[2] = token_id, position, filled
        self.inputs.copy_(self._staged, non_blocking=True)

    def attend(self, layer_idx, query, key, value, scale):
        filled = self.inputs[2:3]
        slot = self.question_slots.index_select(0, filled)
        pt = self.pools.page_tokens
        self.pools.write_slots(layer_idx, (slot // pt, slot % pt), torch.stack([key[:, :, 0], value[:, :, 0]], 1))
        kv_lens = self.static[layer_idx] + filled.to(torch.int32) + 1
        k_pages, v_pages = self.pools.layer_pages(layer_idx)
        return attend_paged(query, k_pages, v_pages, self.tables[layer_idx], kv_lens, scale)


def fixed_step(model, fixed: FixedDecodePlan) -> torch.Tensor:
    """One greedy decode step from ``fixed``'s buffers; returns the next token id ``[1]`` on the device."""
    input_ids = fixed.inputs[0:1].view(1, 1)
    positions = fixed.inputs[1:2].view(1, 1, 1).expand(3, 1, 1)
    hidden = model.decode_forward(input_ids=input_ids, position_ids=positions, plan=fixed)
    return model.logits(hidden[:, -1]).argmax(-1)


class DecodeGraphs:
    """CUDA graphs of the decode step, one per table width (module doc).

    Args:
        model: the engine's adapter (``decode_forward``, ``logits``).
        pools: the engine's page pools.
        num_layers: decoder layers.
        enabled: capture graphs (CUDA only); otherwise ``start`` returns None and questions decode eagerly.
        capture: False runs the fixed-buffer step eagerly instead of replaying it (tests compare it on the CPU).
    """

    def __init__(self, model, pools, num_layers: int, *, enabled: bool, capture: bool = True) -> None:
        self.model = model
        self.pools = pools
        self.num_layers = num_layers
        self.capture = capture
        self.enabled = enabled and (model.device.type == "cuda" or not capture)
        self.failure: str | None = None  # why capturing failed; graphs are off from then on
        self.num_captured = 0
        self.num_steps = 0  # decode steps run from fixed buffers (replayed, or eager with capture off)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, FixedDecodePlan, torch.Tensor | None]] = {}
        self._pool_tensor = None  # the device pool the graphs read; another one invalidates them
        self._memory = None  # one private memory pool for every graph's intermediates

    def start(self, plan):
        """A step function ``step(token_id, position) -> next token id`` for ``plan``'s decode, or None to decode
        eagerly. The first call of a new width captures its graph; if that fails, it returns None."""
        if not self.enabled or plan.recall_probe is not None or plan.rescore_every_tokens > 0:
            return None
        if any(table is None for table in plan.tables):
            return None
        width = -(-max(int(t.shape[1]) for t in plan.tables) // WIDTH_STEP) * WIDTH_STEP
        entry = None

        def step(token: int, position: int) -> int | None:
            nonlocal entry
            if self.pools.device_pool is not self._pool_tensor:  # full mode grew it, maybe mid-answer
                self._graphs.clear()
                self._pool_tensor = self.pools.device_pool
                entry = None
            if entry is None:
                entry = self._graphs.get(width)  # captured by an earlier question, or one running beside this one
            if entry is None:
                entry = self._graphs[width] = self._prepare(plan, width, token, position)
                if entry is None:
                    self._graphs.pop(width)
                    return None
            graph, fixed, next_id = entry
            if not fixed.holds(plan):  # another question of this width stepped since
                fixed.load(plan)
            fixed.set_inputs(token, position, plan.filled_tokens)
            if graph is None:
                next_id = fixed_step(self.model, fixed)
            else:
                graph.replay()
            plan.filled_tokens += 1
            plan.steps += 1
            self.num_steps += 1
            return int(next_id.item())

        return step

    def _prepare(self, plan, width: int, token_id: int, position: int):
        fixed = FixedDecodePlan(self.pools, self.num_layers, width, self.model.device)
        fixed.load(plan)
        if not self.capture:
            return None, fixed, None
        # The warm-up runs the step itself (compiling kernels): it writes this token's KV where the step will.
        fixed.set_inputs(token_id, position, plan.filled_tokens)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fixed_step(self.model, fixed)
            torch.cuda.current_stream().wait_stream(side)
            if self._memory is None:
                self._memory = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._memory, capture_error_mode="thread_local"):
                next_id = fixed_step(self.model, fixed)
        except Exception as err:  # a model whose step cannot be captured decodes eagerly, as before
            self.enabled, self.failure = False, f"{type(err).__name__}: {err}"
            log.warning("decode steps cannot be captured in a CUDA graph, so they run eagerly: %s", self.failure)
            return None
        self.num_captured += 1
        log.info("captured the decode step for tables of %d slots (%d graphs)", width, len(self._graphs))
        return graph, fixed, next_id
