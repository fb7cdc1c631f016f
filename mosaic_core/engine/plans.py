"""Attention plans: what each layer attends to during one forward pass, and what it keeps.

- ``IngestPlan``: a batch of rows, one frame (or the preamble) of one stream each. Each row attends to its
  stream's sink + local window + itself; the new KV is kept for the caller to place in the window.
- ``QuestionPlan``: one stream's question and then its answer, token by token. Each layer attends to
  sink + retrieved clusters + local window + the question and answer so far. Clusters are chosen when the question
  is prefilled and, if configured, again every ``rescore_every_tokens`` decode steps. A layer's retrieved KV is
  gathered on the transfer engine's side stream; the layer waits for its own gather only, right before it attends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mosaic_core.engine.attend import attend_batch, attend_over
from mosaic_core.engine.probes import ENGINE, ProbeRequest, QueryPlanter
from mosaic_core.engine.retrieval import LayerSelection, Retriever
from mosaic_core.engine.scorers import scorer_by_name
from mosaic_core.engine.stream import StreamState
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import NOTHING_PENDING, Moved


class IngestPlan:
    """Bounded attention for a batch of streams: the cost per frame is independent of stream length."""

    def __init__(self, streams: list[StreamState], spec: KVSpec) -> None:
        self.streams = streams
        self.spec = spec
        self.new_kv: list[torch.Tensor | None] = [None] * spec.num_layers  # each [B, 2, H, T, D]
        self.attended_tokens: list[int] = [0] * len(streams)

    def attend(self, layer_idx, query, key, value, scale):
        pasts = [stream.past_layer(layer_idx) for stream in self.streams]
        self.new_kv[layer_idx] = torch.stack([key, value], dim=1)
        if layer_idx == 0:
            self.attended_tokens = [(0 if p is None else p.shape[2]) + key.shape[2] for p in pasts]
        return attend_batch(query, key, value, pasts, scale)

    def row_kv(self, row: int) -> torch.Tensor:
        """The new KV of one row, ``[num_layers, 2, H, T, D]``."""
        return torch.stack([kv[row] for kv in self.new_kv])


class QuestionPlan:
    """Retrieval-augmented attention for one question and its answer.

    Each layer keeps one device buffer, filled once per scoring and then appended to in place:

        [ sink + local window | retrieved clusters | question + answer so far | free ... ]
          <---------- static: rebuilt on scoring -----> <-- grows one token per decode step -->

    so a decode step copies only its own new KV, not the whole attended set. When the retriever shares one
    layer's choice with all later layers, their buffers are built and their gathers queued as soon as that layer
    has chosen, so layer l+1's clusters move while layer l computes.
    """

    def __init__(
        self,
        stream: StreamState,
        retriever: Retriever,
        *,
        rescore_every_tokens: int,
        capacity_tokens: int,
        recall_probe: RecallProbe | None = None,
        plant_queries: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.stream = stream
        self.retriever = retriever
        self.rescore_every_tokens = rescore_every_tokens
        self.capacity_tokens = capacity_tokens
        self.recall_probe = recall_probe
        # Measurement only (mosaic_core.engine.probes): replaces the question's queries at its prefill.
        self.plant_queries = plant_queries
        num_layers = retriever.spec.num_layers
        self.selections: list[LayerSelection | None] = [None] * num_layers
        self.buffers: list[torch.Tensor | None] = [None] * num_layers  # [2, H, static + capacity, D]
        self.gathers: list[Moved] = [NOTHING_PENDING] * num_layers
        self.static_tokens = [0] * num_layers
        self.filled_tokens = [0] * num_layers
        self.steps = 0  # forward passes so far: 0 is the question prefill
        self.selection_history: list[list[LayerSelection]] = []

    def attend(self, layer_idx, query, key, value, scale):
        if self.plant_queries is not None and self.steps == 0:
            query = self.plant_queries(layer_idx, query)
        if self._should_score():
            self._choose(layer_idx, query[0], key.dtype)
        if self.recall_probe is not None:
            self.recall_probe.observe(layer_idx, query[0], self.selections[layer_idx], step=self.steps)
        self.retriever.tiering.tiers.transfers.wait(self.gathers[layer_idx])
        self.gathers[layer_idx] = NOTHING_PENDING  # waited for once; later decode steps need no wait
        buffer, start = self.buffers[layer_idx], self.filled_tokens[layer_idx]
        end = start + key.shape[2]
        assert end <= buffer.shape[2], f"question plan capacity {self.capacity_tokens} tokens exceeded"
        buffer[0, :, start:end] = key[0]
        buffer[1, :, start:end] = value[0]
        self.filled_tokens[layer_idx] = end
        out = attend_over(query[0], buffer[:, :, :end], key.shape[2], scale)
        if layer_idx == len(self.selections) - 1:
            self.steps += 1
        return out[None]

    def _choose(self, layer: int, query: torch.Tensor, dtype: torch.dtype) -> None:
        anchor, last = self.retriever.prefetch_after_layer, len(self.selections) - 1
        if anchor is not None and layer > anchor:
            return  # chosen, and its gather queued, when the anchor layer ran
        selection = self.retriever.select(layer, query)
        self._rebuild(layer, selection, dtype)
        if layer == anchor:
            for later in range(layer + 1, last + 1):
                self._rebuild(later, self.retriever.reuse(later, selection), dtype)
        if layer in (anchor, last):
            self.selection_history.append(list(self.selections))

    def _rebuild(self, layer: int, selection: LayerSelection, dtype: torch.dtype) -> None:
        past = self.stream.past_layer(layer)
        old, old_static, old_filled = self.buffers[layer], self.static_tokens[layer], self.filled_tokens[layer]
        generated = None if old is None else old[:, :, old_static:old_filled]
        static = past.shape[2] + selection.num_tokens
        num_heads, head_dim = past.shape[1], past.shape[3]
        buffer = past.new_empty((2, num_heads, static + self.capacity_tokens, head_dim), dtype=dtype)
        buffer[:, :, : past.shape[2]] = past
        end, self.gathers[layer] = self.retriever.gather_into(selection, buffer, past.shape[2])
        assert end == static, f"gathered {end - past.shape[2]} tokens, selection said {selection.num_tokens}"
        filled = static
        if generated is not None and generated.shape[2]:
            buffer[:, :, static : static + generated.shape[2]] = generated
            filled += generated.shape[2]
        self.selections[layer] = selection
        self.buffers[layer], self.static_tokens[layer], self.filled_tokens[layer] = buffer, static, filled

    def _should_score(self) -> bool:
        if self.steps == 0:
            return True
        return self.rescore_every_tokens > 0 and self.steps % self.rescore_every_tokens == 0


class RecallProbe:
    """Measures attention recall of the retrieved set against an oracle top-k of full attention.

    For each layer, full attention of the question over sink + every history token + local window gives each
    history token its attention mass (summed over heads and question tokens). The oracle keeps the ``budget``
    heaviest history tokens; recall is the mass the retrieved tokens carry over the mass the oracle carries.
    Step 0 is the question's prefill; later steps are decode steps (observed when the answer is longer than one
    token), which show what reusing the question's choice costs as the answer grows.

    With a ``ProbeRequest`` it also scores, at the prefill, the choices other scorers would have made over the
    same units and queries (following the engine's rule for which layers share a choice), and with a planter the
    fraction of the planted span each choice found and the share of full attention the span really got.
    """

    def __init__(
        self,
        stream: StreamState,
        tiering,
        *,
        candidates: list[str],
        budget_tokens: int,
        spec: KVSpec,
        retriever: Retriever | None = None,
        request: ProbeRequest | None = None,
        planter: QueryPlanter | None = None,
    ) -> None:
        self.stream = stream
        self.candidates = candidates
        self.tiering = tiering
        self.budget_tokens = budget_tokens
        self.spec = spec
        self.retriever = retriever
        self.planter = planter
        self.per_step: dict[int, list[float]] = {}  # step -> recall of each layer
        names = request.sweep_scorers if request is not None and retriever is not None else ()
        self.sweep = {name: scorer_by_name(name, seed=retriever.seed + 1) for name in names}
        self.sweep_recall: dict[str, list[float]] = {name: [] for name in (ENGINE, *names)}
        self.sweep_found: dict[str, list[float]] = {name: [] for name in (ENGINE, *names)}
        self.budgets = (request.sweep_budgets if request is not None else ()) or ()
        self.found_at: dict[tuple[str, int], list[float]] = {(n, b): [] for n in names for b in self.budgets}
        self._sweep_choice: dict[tuple[str, int | None], set[str]] = {}
        self.span_masses: list[float] = []
        self._keys: torch.Tensor | None = None
        self._sizes: list[int] = []

    def observe(self, layer: int, query: torch.Tensor, selection: LayerSelection, *, step: int = 0) -> None:
        candidates = self.candidates
        if not candidates:
            return
        keys, sizes = self._history_keys(layer, query.device)  # [H, N_history, D]
        past = self.stream.past_layer(layer)
        keys = torch.cat([past[0].to(keys.dtype), keys], dim=1).float()  # [H, N, D]: sink+window, then history
        num_kv_heads = keys.shape[0]
        grouped = query.float().reshape(num_kv_heads, -1, query.shape[-1])  # [H, group * T, D]
        probs = torch.softmax(torch.einsum("gqd,gnd->gqn", grouped, keys) * self.spec.scale, dim=-1)
        mass = probs.sum(dim=(0, 1))
        start = past.shape[2]
        history_mass = mass[start : start + sum(sizes)]
        oracle = history_mass.topk(min(self.budget_tokens, history_mass.numel())).values.sum().clamp_min(1e-12)
        unit_mass = torch.stack([part.sum() for part in history_mass.split(sizes)]).tolist()
        chosen = set(selection.cluster_ids)
        recall = self._recall(chosen, unit_mass, float(oracle))
        self.per_step.setdefault(step, []).append(recall)
        if step != 0:
            return
        self.sweep_recall[ENGINE].append(recall)
        if self.planter is not None:
            self.sweep_found[ENGINE].append(self.planter.found(chosen, candidates))
            span = self.planter.span_mask(sizes, history_mass.device)
            self.span_masses.append(float(history_mass[span].sum() / history_mass.sum().clamp_min(1e-12)))
        for name, scorer in self.sweep.items():
            choices = self._sweep_choose(name, scorer, layer, query)
            other = choices[None]
            self.sweep_recall[name].append(self._recall(other, unit_mass, float(oracle)))
            if self.planter is not None:
                self.sweep_found[name].append(self.planter.found(other, candidates))
                for budget in self.budgets:
                    self.found_at[(name, budget)].append(self.planter.found(choices[budget], candidates))

    def _history_keys(self, layer: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Every candidate's keys of ``layer``, in candidate order; each unit is read from its tier once per question
        (all layers at once), not once per layer: at 60 minutes of one-frame units that is 3,600 reads, not 100k."""
        if self._keys is None:
            # each unit's keys [L, H, n, D]; its values are dropped at once
            units = [self.tiering.tiers.read(cid).to(device)[:, 0].contiguous() for cid in self.candidates]
            self._sizes = [u.shape[2] for u in units]
            self._keys = torch.cat(units, dim=2)  # [L, H, N, D]
        return self._keys[layer], self._sizes

    def _recall(self, chosen: set[str], unit_mass: list[float], oracle: float) -> float:
        retrieved = sum(m for cid, m in zip(self.candidates, unit_mass, strict=True) if cid in chosen)
        # Retrieving more tokens than the budget (full mode) can carry more mass than the oracle: cap at 1.
        return min(1.0, retrieved / oracle)

    def _sweep_choose(self, name: str, scorer, layer: int, query: torch.Tensor) -> dict[int | None, set[str]]:
        """The scorer's choice at the question's budget (key None) and at each swept budget."""
        retriever = self.retriever
        anchor = retriever.prefetch_after_layer
        if anchor is not None and layer > anchor and (name, None) in self._sweep_choice:
            return {b: self._sweep_choice[(name, b)] for b in (None, *self.budgets)}
        mean, var, log_count = retriever.summaries
        scores = scorer.scores(query, mean[:, layer], var[:, layer], log_count, scale=self.spec.scale)
        for budget in (None, *self.budgets):
            self._sweep_choice[(name, budget)] = set(retriever.fill_budget(scores, budget))
        return {b: self._sweep_choice[(name, b)] for b in (None, *self.budgets)}

    def report(self, request: ProbeRequest) -> None:
        """Writes the prefill's per-scorer means into ``request``."""
        request.recall = {name: v for name, values in self.sweep_recall.items() if (v := _mean(values)) is not None}
        request.span_found = {name: v for name, values in self.sweep_found.items() if (v := _mean(values)) is not None}
        request.span_found_at = {key: v for key, values in self.found_at.items() if (v := _mean(values)) is not None}
        request.span_mass = _mean(self.span_masses)

    @property
    def recall(self) -> float | None:
        """Mean over layers at the question's prefill."""
        return _mean(self.per_step.get(0, []))

    @property
    def decode_recall(self) -> float | None:
        """Mean over layers and decode steps; None when only the prefill was observed."""
        return _mean([r for step, values in self.per_step.items() if step > 0 for r in values])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
