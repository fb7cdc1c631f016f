"""Attention recall of a question's retrieved set against full attention (``RecallProbe``): what the probes of
``bench engine`` and ``mosaic fidelity`` report, never run on a question that was not asked to probe."""

from __future__ import annotations

import torch

from mosaic_core.engine.probes import ENGINE, UNIT_CEILING, ProbeRequest, QueryPlanter
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.scorers import scorer_by_name
from mosaic_core.engine.selection import LayerSelection, fill_in_order
from mosaic_core.engine.stream import StreamState
from mosaic_core.memory.layout import KVSpec


class RecallProbe:
    """Measures attention recall of the retrieved set against an oracle top-k of full attention.

    For each layer, full attention of the question over sink + every history token + local window gives each
    history token its attention mass (summed over heads and question tokens). The oracle keeps the ``budget``
    heaviest history tokens; recall is the mass the retrieved tokens carry over the mass the oracle carries.
    Step 0 is the question's prefill; later steps are decode steps (observed when the answer is longer than one
    token), which show what reusing the question's choice costs as the answer grows.

    With a ``ProbeRequest`` it also scores, at the prefill, the choices other scorers would have made over the
    same units and queries (following the engine's rule for which layers share a choice), and with a planter the
    fraction of the planted span each choice found and the share of full attention the span really got. For the
    question's own queries it adds the unit's ceiling (``UNIT_CEILING``): each layer's units taken in order of
    their true mass per token while they fit, what a perfect scorer of whole units would come near. The gap
    between a scorer and the ceiling is the scorer's; the gap between the ceiling and 1 is the unit's.
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
        self.ceiling = request is not None and planter is None
        if self.ceiling:
            self.sweep_recall[UNIT_CEILING] = []
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
        if self.ceiling:
            best = densest_first(candidates, unit_mass, sizes, self.budget_tokens)
            self.sweep_recall[UNIT_CEILING].append(self._recall(best, unit_mass, float(oracle)))
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
        past = retriever.past_logsumexp(layer, query) if scorer.needs_past else None
        scores = scorer.scores(query, mean[:, layer], var[:, layer], log_count, scale=self.spec.scale, past_lse=past)
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


def densest_first(units: list[str], mass: list[float], sizes: list[int], budget: int) -> set[str]:
    """The units taken in order of ``mass`` per token (``sizes``), each while it still fits ``budget`` tokens:
    the unit ceiling's choice, given each unit's true attention mass."""
    order = sorted(range(len(sizes)), key=lambda i: -mass[i] / sizes[i])
    return {units[i] for i in fill_in_order(order, sizes, budget, min(sizes))}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
