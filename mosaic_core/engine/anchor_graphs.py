"""A question prefill's anchor layers, replayed from CUDA graphs cut where each layer chooses what it reads.

The layers up to the retriever's anchor (``prefetch_after_layer``) choose clusters on the host from their own
queries, so they could not replay from one graph: they ran eagerly, 91 kernel launches and 3.6 to 5.9 ms of host
time for the 7B shape's two anchor layers on the H200, while the later layers replay from a chain of graphs
(``prefill_graphs``). Here they replay from graphs cut at each anchor layer's attention. A question with no
history took 8.45 ms to its first token this way against 11.54 eagerly; at 60 minutes of history, where the
question waits for its retrieved KV, 29.6 against 29.7 ms (bench/NOTES.md, session 12). The pieces:

    piece 0:  embedding, layer 0 up to its queries   | host: layer 0 chooses, its table is loaded
    piece 1:  layer 0's attention and the rest of it,  |
              layer 1 up to its queries               | host: layer 1 chooses (and queues every later layer's
    piece 2:  layer 1's attention and the rest of it  |       staging), its table is loaded

Every piece reads fixed buffers (``FixedAnchorPlan``): the question's token ids and positions, zero padded to a
multiple of ``QUESTION_STEP`` (``prefill_graphs``); where each token's KV goes; and one slot table per anchor
layer with its length. A table is as wide as any choice of this question can need (sink, window, the whole
retrieval budget, and the question's own slots, as ``graph_width`` rounds it), so the pieces are known before the
first layer chooses: one set per (question length, width). The pad rows come after the question's tokens, so
causal attention keeps them out of every real row, and only the real rows' queries choose.

The cut is made while capturing: the attention plan ends the graph under capture when a layer hands it its
queries, and begins the next one before it attends (``warm_and_capture_pieces``). What crosses a cut (the
layer's input, its queries, keys and values) stays referenced, so no later capture reuses its memory.

``capture=False`` runs the same pieces eagerly from the fixed buffers, choosing at the same points, which is what
the CPU tests compare with the eager prefill.
"""

from __future__ import annotations

import torch

from mosaic_core.engine.decode_graphs import graph_width
from mosaic_core.engine.fixed_buffers import load_table, load_write_index, write_and_attend
from mosaic_core.memory.transfer import NOTHING_PENDING


def anchor_width(plan) -> int:
    """The widest table any anchor layer of ``plan`` can build (sink and window, the whole retrieval budget, then
    the question's slots) as ``graph_width`` rounds it."""
    return graph_width(plan, len(plan.past_slots) + plan.retriever.budget_tokens + plan.capacity_tokens)


class FixedAnchorPlan:
    """The attention plan of the anchor pieces, every input in a buffer that outlives the pass (module doc)."""

    def __init__(self, model, pools, num_layers: int, tokens: int, width: int) -> None:
        device = model.device
        self.pools = pools
        self.tokens = tokens
        self.input_ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        self.positions = torch.zeros((3, 1, tokens), dtype=torch.int64, device=device)
        self.write_index = torch.zeros((2, tokens), dtype=torch.int64, device=device)  # pages, offsets
        self.tables = torch.full((num_layers, 1, width), -1, dtype=torch.int32, device=device)
        self.kv_lens = torch.zeros((num_layers, 1), dtype=torch.int32, device=device)
        self.queries: list[torch.Tensor | None] = [None] * num_layers  # each layer's, as its piece leaves them
        # Called with the layer once its queries are in ``queries``, before it attends: while capturing, the cut
        # between two pieces; when the pieces run eagerly, the choice.
        self.at_query = None
        self.out: torch.Tensor | None = None  # the last piece's hidden states [1, tokens, hidden]

    def load(self, model, plan, input_ids: torch.Tensor, cursor: int) -> None:
        """Copies one question's token ids (``[1, T]``), positions and slots in; each layer's table is loaded when
        the layer has chosen (``AnchorPieces``)."""
        self.input_ids.zero_()
        self.input_ids[:, : input_ids.shape[1]].copy_(input_ids)
        self.positions.copy_(model.text_positions(cursor, self.tokens)[:, None])
        load_write_index(self.write_index, self.pools, plan)

    def attend(self, layer_idx, query, key, value, scale):
        self.queries[layer_idx] = query
        if self.at_query is not None:
            self.at_query(layer_idx)
        return write_and_attend(
            self.pools, layer_idx, query, key, value, self.write_index, self.tables[layer_idx],
            self.kv_lens[layer_idx], scale,
        )  # fmt: skip


def anchor_forward(model, fixed: FixedAnchorPlan, layers: range) -> torch.Tensor:
    """The embedding and ``layers`` over ``fixed``'s buffers; the hidden states after the last of them."""
    hidden = model.embed_text(fixed.input_ids)
    return model.text_layers(hidden, position_ids=fixed.positions, plan=fixed, layers=layers)


class AnchorPieces:
    """The anchor layers' pieces for one (question length, width): captured graphs, or None to run the same
    pieces eagerly from the same buffers, choosing at the same points."""

    def __init__(self, fixed: FixedAnchorPlan, layers: range, graphs: list | None) -> None:
        self.fixed = fixed
        self.layers = layers
        self.graphs = graphs

    def prefill(self, model, plan, input_ids: torch.Tensor, cursor: int) -> torch.Tensor:
        """The anchor layers of ``plan``'s prefill; returns the real rows' hidden states ``[1, T, hidden]``.

        After each layer's piece the question plan chooses from the layer's queries (its real rows), builds the
        layer's table and queues the staging; the next piece attends once the layer's staging has landed."""
        fixed, num_real = self.fixed, input_ids.shape[1]
        fixed.load(model, plan, input_ids, cursor)
        if self.graphs is None:
            fixed.at_query = lambda layer: self._choose(plan, layer, num_real)
            try:
                fixed.out = anchor_forward(model, fixed, self.layers)
            finally:
                fixed.at_query = None
        else:
            for layer in self.layers:
                self.graphs[layer].replay()
                self._choose(plan, layer, num_real)
            self.graphs[-1].replay()
        return fixed.out[:, :num_real]

    def _choose(self, plan, layer: int, num_real: int) -> None:
        fixed = self.fixed
        plan.choose_at_prefill(layer, fixed.queries[layer][0][:, :num_real])
        load_table(fixed.tables[layer], fixed.kv_lens[layer], plan, layer, fixed.tokens)
        plan.retriever.tiering.tiers.transfers.wait(plan.gathers[layer])
        plan.gathers[layer] = NOTHING_PENDING
