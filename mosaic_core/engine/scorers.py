"""How a question ranks the retrieval units (clusters or frame blocks) of one layer: strategies chosen by name.

Every scorer returns ``[C]`` float32 scores on the query's device; the retriever fills its budget in score order.

- ``spread``: the Gaussian estimate of each unit's attention mass,
  ``log n + s q.mu + 1/2 s^2 sum_d q_d^2 var_d``, maximised over the query rows of each KV head, heads combined by
  log-sum-exp.
- ``spread_per_token``: ``spread`` less ``log n``, the estimate of attention mass per token. The budget is counted
  in tokens, so filling it with the densest units first is the usual greedy answer to that knapsack; ``spread``
  ranks by total mass, which favours large units. Measured beside ``spread`` in scenario A's sweep.
- ``spread_share``: the same estimate for every query row, each row's estimates turned into shares of that row's
  attention (a softmax over the units and the stream's sink and window, whose keys are read exactly), and the
  shares summed over the rows. Attention recall (``recall_probe.RecallProbe``) sums each row's attention probabilities
  over heads and question tokens, so this is the quantity it counts; ``spread``'s maximum over rows lets the
  row with the largest logits decide, however little of its attention the history gets, and its log-sum-exp over
  heads lets the head with the largest logits decide over the others.
- ``spread_share_per_token`` (cluster mode's own, ``RetrievalMode.own_scorer``): ``spread_share`` less ``log n``,
  its share per token.
- ``mean_key`` (ReKV / InfLLM): the dot product of the queries with the unit's mean key, same reduction.
- ``random``: a uniformly random order (chance), seeded per question so reruns repeat.
- ``recent``: newest units first (what a sliding window would keep).

``spread``, ``spread_per_token`` and ``mean_key`` run as the same Triton scoring kernel on CUDA (``use_spread``
switches the variance and count terms off), so no mode gets a faster scorer than another; elsewhere, the kernel's
torch twin. The share scorers need every row's estimates, not the kernel's maximum, so they run as torch matrix
products on every device.
"""

from __future__ import annotations

from typing import Protocol

import torch

from mosaic_core.config import SCORER_NAMES
from mosaic_core.errors import UnknownPolicyError
from mosaic_core.kernels import kernels_ready
from mosaic_core.kernels.reference import cluster_row_estimates


class Scorer(Protocol):
    name: str
    needs_past: bool  # whether ``scores`` reads ``past_lse``

    def scores(
        self,
        query: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        log_count: torch.Tensor,
        *,
        scale: float,
        past_lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query`` ``[Hq, T, D]``; ``mean``/``var`` ``[C, Hkv, D]``; ``log_count`` ``[C]``; ``past_lse`` each
        query row's log-sum-exp of its scaled logits over the stream's sink and window keys ``[Hq, T]``
        (``attend.past_logsumexp``), or None -> ``[C]`` float32."""
        ...


class KeyScorer:
    """``spread``, ``spread_per_token`` or ``mean_key``: one kernel launch per scored layer on CUDA."""

    needs_past = False

    def __init__(self, *, use_spread: bool, per_token: bool = False) -> None:
        self.use_spread = use_spread
        self.per_token = per_token
        self.name = ("spread_per_token" if per_token else "spread") if use_spread else "mean_key"

    def scores(self, query, mean, var, log_count, *, scale, past_lse=None):
        if query.is_cuda and kernels_ready():
            from mosaic_core.kernels.scoring import cluster_scores

            per_head = cluster_scores(query, mean, var, log_count.float(), scale=scale, use_spread=self.use_spread)
        else:
            from mosaic_core.kernels.reference import cluster_scores_reference

            per_head = cluster_scores_reference(
                query, mean, var, log_count.float(), scale=scale, use_spread=self.use_spread
            )
        total = torch.logsumexp(per_head, dim=1)
        return total - log_count.float() if self.per_token else total


class ShareScorer:
    """``spread_share`` or ``spread_share_per_token`` (module doc): the estimated attention share of each unit,
    summed over the query rows."""

    needs_past = True

    def __init__(self, *, per_token: bool = False) -> None:
        self.per_token = per_token
        self.name = "spread_share_per_token" if per_token else "spread_share"

    def scores(self, query, mean, var, log_count, *, scale, past_lse=None):
        est = cluster_row_estimates(query, mean, var, log_count, scale=scale)  # [G, R, C]
        row_total = torch.logsumexp(est, dim=2)  # [G, R]: each row's estimated mass on the units
        if past_lse is not None:  # [Hq, T] -> the rows' order, [G, R] (``grouped_rows``)
            row_total = torch.logaddexp(row_total, past_lse.float().reshape(row_total.shape))
        shares = torch.logsumexp((est - row_total[..., None]).flatten(0, 1), dim=0)  # [C]: log of the summed shares
        return shares - log_count.float() if self.per_token else shares


class RandomScorer:
    """Chance: a random permutation of the units; the same seed gives the same order."""

    name = "random"
    needs_past = False

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, query, mean, var, log_count, *, scale, past_lse=None):
        return torch.rand(mean.shape[0], generator=self.generator).to(query.device)


class RecentScorer:
    """Newest first: candidates arrive oldest first, so the score is the position."""

    name = "recent"
    needs_past = False

    def scores(self, query, mean, var, log_count, *, scale, past_lse=None):
        return torch.arange(mean.shape[0], dtype=torch.float32, device=query.device)


def scorer_by_name(name: str, *, seed: int = 0) -> Scorer:
    """The scorer called ``name``; an unknown name raises and lists the valid ones."""
    if name == "spread":
        return KeyScorer(use_spread=True)
    if name == "spread_per_token":
        return KeyScorer(use_spread=True, per_token=True)
    if name == "spread_share":
        return ShareScorer()
    if name == "spread_share_per_token":
        return ShareScorer(per_token=True)
    if name == "mean_key":
        return KeyScorer(use_spread=False)
    if name == "random":
        return RandomScorer(seed)
    if name == "recent":
        return RecentScorer()
    raise UnknownPolicyError(f"unknown scorer {name!r}; valid scorers are: {', '.join(SCORER_NAMES)}")
