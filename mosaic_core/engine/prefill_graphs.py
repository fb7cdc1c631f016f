"""A question's prefill: its anchor layers replay from graphs cut where they choose, the rest from a chain.

An eager 7B forward pass launches about 930 kernels from Python, so a question's time to first token was mostly
host time (``mosaic bench profile``), as decode steps were before ``decode_graphs``. In cluster and frame mode the
layers up to ``prefetch_after_layer`` score the candidates and every later layer reuses that choice, so from the
next layer on the pass reads fixed inputs (``FixedPrefillPlan``):

- ``hidden``: the question's hidden states after the anchor layers, zero padded to a multiple of
  ``QUESTION_STEP`` tokens, and ``positions``, their text positions;
- ``table``, ``kv_len``: the anchor's slot table, which every later layer reads (``QuestionPlan`` shares it),
  -1 padded to the graph's width, and how many of its slots the question reads: the static part and the padded
  question;
- ``write_index``: where each question token's KV goes (pages and offsets of the question's first slots);
- ``last``: the row of the question's last real token.

Those layers replay from a chain of graphs of ``segment_layers`` layers each, every one reading the hidden states
the one before it left; each layer writes its KV into the question's slots and attends in place, and the last
graph ends with the final norm and the last real row's hidden state. One chain is kept per (rounded question
length, table width as ``decode_graphs.graph_width`` rounds it: the widest table of the stream's questions).

The chain is what lets the retrieved KV cross PCIe while the question computes: the anchor queued every later
layer's staging on the side stream, and before each graph the compute stream waits (``wait_event``, no host sync)
only for its own layers' staging. One graph of all the layers had to wait for every layer's KV before it started,
so at 60 minutes it was no faster than the eager layers, which wait layer by layer (bench/NOTES.md).

Padding rows come after the question's tokens, so causal attention keeps them out of every real row. Their KV
lands in the question's next slots, where the answer's tokens are written before any step reads them (a decode
step attends only to the slots filled so far, its own included).

The anchor layers themselves (up to ``prefetch_after_layer``) replay from graphs cut at each one's attention, so
that the host chooses between two pieces (``anchor_graphs``); with ``anchor=False`` they run eagerly.

Modes that score every layer (token, full) and questions that measure recall or plant queries run the whole pass
eagerly, as every question does on the CPU; there ``capture=False`` runs the fixed-buffer layers eagerly instead
of replaying them, so tests can compare the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from mosaic_core.engine.anchor_graphs import AnchorPieces, FixedAnchorPlan, anchor_forward, anchor_width
from mosaic_core.engine.decode_graphs import graph_width
from mosaic_core.engine.fixed_buffers import load_table, load_write_index, write_and_attend
from mosaic_core.engine.graph_capture import GraphPool
from mosaic_core.memory.transfer import NOTHING_PENDING

log = logging.getLogger(__name__)
QUESTION_STEP = 16  # question lengths are rounded up to this, so a few graphs serve every question


def padded_length(num_tokens: int) -> int:
    return -(-num_tokens // QUESTION_STEP) * QUESTION_STEP


class FixedPrefillPlan:
    """The attention plan of a prefill's later layers, every input in a buffer that outlives the pass."""

    def __init__(self, model, pools, first_layer: int, tokens: int, width: int, hidden_like: torch.Tensor) -> None:
        device = model.device
        self.pools = pools
        self.first_layer = first_layer
        self.tokens = tokens
        self.table = torch.full((1, width), -1, dtype=torch.int32, device=device)
        self.kv_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.write_index = torch.zeros((2, tokens), dtype=torch.int64, device=device)  # pages, offsets
        self.hidden = hidden_like.new_zeros((1, tokens, hidden_like.shape[-1]))
        self.positions = torch.zeros((3, 1, tokens), dtype=torch.int64, device=device)
        self.last = torch.zeros(1, dtype=torch.int64, device=device)

    def load(self, model, plan, hidden: torch.Tensor, cursor: int) -> None:
        """Copies one question's tables, slots, hidden states (``[1, T, hidden]``) and positions in."""
        num_real = hidden.shape[1]
        load_table(self.table, self.kv_len, plan, self.first_layer, self.tokens)
        load_write_index(self.write_index, self.pools, plan)
        self.hidden.zero_()
        self.hidden[:, :num_real].copy_(hidden)
        self.positions.copy_(model.text_positions(cursor, self.tokens)[:, None])
        self.last.fill_(num_real - 1)

    def attend(self, layer_idx, query, key, value, scale):
        return write_and_attend(
            self.pools, layer_idx, query, key, value, self.write_index, self.table, self.kv_len, scale
        )


def fixed_layers(model, fixed: FixedPrefillPlan, hidden: torch.Tensor, layers: range) -> torch.Tensor:
    """``layers`` of the later layers from ``fixed``'s buffers over ``hidden``; after the model's last layer also
    the final norm and the last real row (``[1, 1, hidden]``)."""
    hidden = model.text_layers(hidden, position_ids=fixed.positions, plan=fixed, layers=layers)
    if layers.stop < model.kv_spec.num_layers:
        return hidden
    return model.final_norm(hidden).index_select(1, fixed.last)


@dataclass(slots=True)
class Segment:
    """Some consecutive later layers of a prefill: their graph (None: they run eagerly) and its output buffer."""

    layers: range
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


def segments_of(first: int, num_layers: int, segment_layers: int) -> list[range]:
    return [range(start, min(start + segment_layers, num_layers)) for start in range(first, num_layers, segment_layers)]


class PrefillGraphs:
    """CUDA graphs of the question prefill's later layers (module doc).

    Args:
        model: the engine's adapter (``embed_text``, ``text_layers``, ``final_norm``).
        pools: the engine's page pools.
        enabled: capture graphs (CUDA only); otherwise every prefill runs eagerly.
        segment_layers: layers per graph of the chain (``EngineConfig.prefill_graph_layers``); the last graph's
            layers are what still runs after the last layer's KV has landed.
        capture: False runs the fixed-buffer layers eagerly instead of replaying them (tests compare them).
        anchor: the anchor layers replay too, from graphs cut where they choose (``anchor_graphs``); False runs
            them eagerly.
    """

    def __init__(
        self, model, pools, *, enabled: bool, segment_layers: int = 4, capture: bool = True, anchor: bool = True
    ) -> None:
        self.model = model
        self.anchor = anchor
        self.segment_layers = segment_layers
        self.pools = pools
        self.capture = capture
        self.enabled = enabled and (model.device.type == "cuda" or not capture)
        self.num_prefills = 0  # prefills whose later layers ran from fixed buffers
        self.num_anchor_prefills = 0  # prefills whose anchor layers did (``anchor_graphs``)
        self._graphs: dict[tuple[int, int, int], tuple[FixedPrefillPlan, list[Segment]]] = {}
        self._anchors: dict[tuple[int, int, int], AnchorPieces] = {}
        self._pool_tensor = None  # the device pool the graphs read; another one invalidates them
        self.graph_pool = GraphPool("question prefills")  # off for good after a failed capture

    def usable(self, plan, num_tokens: int) -> bool:
        """Whether ``plan``'s prefill of ``num_tokens`` can replay its later layers: layers after the retriever's
        anchor reuse its choice, and the question's pages hold the padded question."""
        return (
            self.enabled
            and plan.retriever.prefetch_after_layer is not None
            and plan.recall_probe is None
            and plan.plant_queries is None
            and padded_length(num_tokens) <= plan.capacity_tokens
        )

    def prefill(self, plan, input_ids: torch.Tensor, cursor: int) -> torch.Tensor:
        """The question's forward pass under ``plan``; returns its last token's final hidden state ``[1, hidden]``.

        Layers up to the retriever's anchor replay from graphs cut where they choose what every layer reads
        (``anchor_graphs``); the rest replay from a chain of graphs, each once its own layers' staging has landed.
        Either runs eagerly when this plan cannot use them or capturing fails.
        """
        model, num_layers = self.model, self.model.kv_spec.num_layers
        num_real = input_ids.shape[1]
        positions = model.text_positions(cursor, num_real)[:, None]
        if not self.usable(plan, num_real):
            return model.forward(input_ids=input_ids, position_ids=positions, plan=plan)[:, -1]
        first = plan.retriever.prefetch_after_layer + 1
        with record_function("prefill.anchor_layers"):  # profiler ranges: ``mosaic bench profile --bare``
            anchor = self._anchor(plan, first, num_real, input_ids, cursor)
            if anchor is None:
                embedded = model.embed_text(input_ids)
                hidden = model.text_layers(embedded, position_ids=positions, plan=plan, layers=range(first))
            else:
                hidden = anchor.prefill(model, plan, input_ids, cursor)
        entry = self._entry(plan, first, num_real, hidden, cursor)
        if entry is None:
            rest = model.text_layers(hidden, position_ids=positions, plan=plan, layers=range(first, num_layers))
            return model.final_norm(rest)[:, -1]
        fixed, segments = entry
        transfers = plan.retriever.tiering.tiers.transfers
        with record_function("prefill.load_buffers"):
            fixed.load(model, plan, hidden, cursor)
        with record_function("prefill.chain"):
            return self._replay(plan, fixed, segments, transfers, num_real)

    def _replay(self, plan, fixed: FixedPrefillPlan, segments: list[Segment], transfers, num_real: int):
        model, hidden = self.model, fixed.hidden
        for segment in segments:
            for layer in segment.layers:  # their staging was queued when the anchor chose
                transfers.wait(plan.gathers[layer])
                plan.gathers[layer] = NOTHING_PENDING
            if segment.graph is None:
                hidden = fixed_layers(model, fixed, hidden, segment.layers)
            else:
                segment.graph.replay()
                hidden = segment.out
        plan.filled_tokens = num_real
        plan.steps = 1
        self.num_prefills += 1
        return hidden[:, 0].clone()

    def _anchor(self, plan, first: int, num_real: int, input_ids: torch.Tensor, cursor: int) -> AnchorPieces | None:
        """The anchor layers' pieces for this question (``anchor_graphs``), captured on first use; None: they
        run eagerly under ``plan`` (anchor graphs off, or capturing failed)."""
        if not self.anchor:
            return None
        self._drop_if_pool_changed()
        tokens, width = padded_length(num_real), anchor_width(plan)
        key = (first, tokens, width)
        if key not in self._anchors:
            model, layers = self.model, range(first)
            fixed = FixedAnchorPlan(model, self.pools, first, tokens, width)
            if not self.capture:
                self._anchors[key] = AnchorPieces(fixed, layers, None)
            else:
                fixed.load(model, plan, input_ids, cursor)  # the warm-ups write the KV where the replays will

                def set_cut(cut) -> None:
                    fixed.at_query = cut

                captured = self.graph_pool.capture_pieces(
                    lambda: anchor_forward(model, fixed, layers), set_cut, len(layers) + 1
                )
                if captured is None:
                    self.enabled = False
                    return None
                graphs, fixed.out = captured
                self._anchors[key] = AnchorPieces(fixed, layers, graphs)
                log.info("captured the anchor layers of %d-token questions over %d-slot tables", tokens, width)
        self.num_anchor_prefills += 1
        return self._anchors[key]

    def _drop_if_pool_changed(self) -> None:
        if self.pools.device_pool is not self._pool_tensor:  # full mode grew it
            self._graphs.clear()
            self._anchors.clear()
            self._pool_tensor = self.pools.device_pool

    def _entry(self, plan, first: int, num_real: int, hidden: torch.Tensor, cursor: int):
        self._drop_if_pool_changed()
        if any(table is not plan.tables[first] for table in plan.tables[first:]):
            return None  # the later layers do not share one table: they run eagerly
        tokens = padded_length(num_real)
        width = graph_width(plan, int(plan.tables[first].shape[1]))
        key = (first, tokens, width)
        if key not in self._graphs:
            entry = self._prepare(plan, first, tokens, width, hidden, cursor)
            if entry is None:
                return None
            self._graphs[key] = entry
        return self._graphs[key]

    def _prepare(self, plan, first: int, tokens: int, width: int, hidden: torch.Tensor, cursor: int):
        model = self.model
        fixed = FixedPrefillPlan(model, self.pools, first, tokens, width, hidden)
        layer_ranges = segments_of(first, model.kv_spec.num_layers, self.segment_layers)
        if not self.capture:
            return fixed, [Segment(layers) for layers in layer_ranges]
        # The warm-ups run the layers themselves (compiling kernels): they write the KV where the replay will.
        fixed.load(model, plan, hidden, cursor)
        segments, previous = [], fixed.hidden
        for layers in layer_ranges:
            captured = self.graph_pool.capture(lambda h=previous, r=layers: fixed_layers(model, fixed, h, r))
            if captured is None:
                self.enabled = False
                return None
            graph, previous = captured
            segments.append(Segment(layers, graph, previous))
        log.info("captured the prefill of %d-token questions over %d-slot tables", tokens, width)
        return fixed, segments
