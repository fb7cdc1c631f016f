"""Measurement hooks for fidelity: planted-attention probes and scorer sweeps. Never on in serving.

Why planted probes. With random weights (the shape presets) a question's queries attend almost uniformly, so
"attention recall against an oracle top-k" barely separates any scorer from chance: there is nothing to find. A
planted probe makes one span of the history the right answer by construction. For each layer the question's
queries are replaced by a query pointing at that span's keys:

    u_g  = unit(mean key of the span - mean key of all history)        per KV head g (post-RoPE keys, as stored)
    q_h  = beta_g * u_g   for every q head h of group g and every question token
    beta_g such that  scale * beta_g * u_g . (mu_span - mu_all) = log(history tokens / span tokens) + margin

so that the span's keys out-score the average key by ``margin`` nats beyond what its size alone would need. The
queries are replaced where the attention receives them (after the query projection and RoPE): that is exactly a
query projection whose output for the question's tokens is ``R^-1 q`` (R the RoPE rotation at that position), and
it spares inverting RoPE per position. ``span_mass`` reports the share of full attention the span then really
gets, so a probe that failed to plant shows as such instead of as a retrieval miss.

What random weights can show with probes: whether a scorer, a retrieval unit and the shared-layer choice find KV
that the queries demonstrably point at, at a given budget, against random and most-recent baselines, and what
whole-unit fetching costs when units straddle the span. What they cannot show: whether real questions' queries
point at coherent spans at all, whether clusters formed from real vision embeddings match what real questions
attend to together, or answer quality. Those need a real checkpoint (``--model PATH``) and real questions.

Use:

    with probing(ProbeRequest(span=(120, 123), sweep_scorers=("random", "recent"))) as request:
        engine.answer("cam", "any text", max_new_tokens=1)
    request.span_found["engine"], request.recall["random"], request.span_mass
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.memory.layout import KVSpec

ENGINE = "engine"  # the key of the engine's own choice in a request's results
# The key of the best choice of whole units a layer could make if it knew each unit's true attention mass: units
# in order of true mass per token, each taken while it fits (a real question's recall only; no scorer knows this).
UNIT_CEILING = "unit_ceiling"


@dataclass(slots=True)
class ProbeRequest:
    """What to measure on the next questions asked inside ``probing``; the question fills the results.

    Attributes:
        span: frames ``(first, last)`` (inclusive, stream frame indices) the planted queries point at; None
            keeps the question's own queries.
        recurs_at: further ``(first, last)`` spans the same queries point at, as one probe: the other visits of
            a recurring scene. The planted direction is the mean key of every span's tokens together, and "found"
            is the share of all their tokens retrieved.
        sweep_scorers: other scorers to evaluate on the same queries and the same units (they do not change
            what the engine retrieves): their choices are scored offline with the same recall and span metrics.
        margin: nats by which the span's keys out-score the average key, beyond its size.
        recall: per scorer (``ENGINE`` for the engine's own choice), attention recall against the oracle top-k,
            mean over layers.
        span_found: per scorer, the fraction of the span's tokens retrieved, mean over layers.
        sweep_budgets: other token budgets at which every swept scorer's choice is also scored (a choice at
            budget B is what the engine would retrieve with that scorer and budget, shared layers included).
        span_found_at: per (scorer, budget in ``sweep_budgets``), the same fraction.
        span_mass: share of full attention over the history that lands on the span (did the plant work).
    """

    span: tuple[int, int] | None = None
    recurs_at: tuple[tuple[int, int], ...] = ()
    sweep_scorers: tuple[str, ...] = ()
    sweep_budgets: tuple[int, ...] = ()
    margin: float = 4.0
    recall: dict[str, float] = field(default_factory=dict)
    span_found: dict[str, float] = field(default_factory=dict)
    span_found_at: dict[tuple[str, int], float] = field(default_factory=dict)
    span_mass: float | None = None


_ACTIVE: ContextVar[ProbeRequest | None] = ContextVar("mosaic_probe_request", default=None)


@contextmanager
def probing(request: ProbeRequest) -> Iterator[ProbeRequest]:
    """Questions asked inside the block are measured (and planted) as ``request`` says."""
    token = _ACTIVE.set(request)
    try:
        yield request
    finally:
        _ACTIVE.reset(token)


def active_request() -> ProbeRequest | None:
    return _ACTIVE.get()


def span_token_ranges(
    stream: StreamState, summaries: SummaryIndex, candidates: list[str], spans: list[tuple[int, int]]
) -> list[list[range]]:
    """Per candidate, the token ranges of its stored KV that belong to the frames of ``spans`` (inclusive).

    A unit stores its frames in the order its record lists them (as they left the local window, then joined);
    frames still in the window are not stored.
    """
    records = stream.records()
    out = []
    for cluster_id in candidates:
        record, stored = records[cluster_id], summaries.count(cluster_id)
        ranges, offset = [], 0
        for frame, num_tokens in zip(record.frame_indices, record.frame_num_tokens, strict=True):
            if offset + num_tokens > stored:
                break
            if any(first <= frame <= last for first, last in spans):
                ranges.append(range(offset, offset + num_tokens))
            offset += num_tokens
        out.append(ranges)
    return out


class QueryPlanter:
    """Replaces a question's queries, layer by layer, with queries that point at one span of the history."""

    def __init__(self, stream: StreamState, tiering, candidates: list[str], spec: KVSpec, request: ProbeRequest):
        assert request.span is not None, "a planter needs a span"
        self.spec = spec
        self.ranges = span_token_ranges(stream, tiering.summaries, candidates, [request.span, *request.recurs_at])
        self.span_tokens = sum(len(r) for ranges in self.ranges for r in ranges)
        if self.span_tokens == 0:
            spans = [request.span, *request.recurs_at]
            raise ValueError(f"spans {spans} have no stored tokens among the question's candidates")
        self.margin = request.margin
        self._span_units = [(cid, ranges) for cid, ranges in zip(candidates, self.ranges, strict=True) if ranges]
        self._tiering = tiering
        mean, _, log_count = tiering.summaries.all_layers(candidates)  # [C, L, H, D], [C]
        counts = log_count.exp()
        self._history_mean = (mean * counts[:, None, None, None]).sum(0) / counts.sum()  # [L, H, D]
        self._history_tokens = float(counts.sum())

    def plant(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, Hq, T, D]`` -> the planted query of the same shape and dtype."""
        keys = torch.cat(
            [
                self._tiering.tiers.read(cid)[layer, 0][:, r.start : r.stop].to(query.device, torch.float32)
                for cid, ranges in self._span_units  # units of one span may live in different tiers
                for r in ranges
            ],
            dim=1,
        )  # [H, n, D]
        span_mean = keys.mean(dim=1)  # [H, D]
        direction = span_mean - self._history_mean[layer].to(query.device)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        gap = ((span_mean - self._history_mean[layer].to(query.device)) * direction).sum(-1)  # [H]
        target = math.log(max(self._history_tokens / self.span_tokens, 1.0)) + self.margin
        beta = target / (self.spec.scale * gap.clamp_min(1e-6))  # [H]
        planted = (beta[:, None] * direction).repeat_interleave(self.spec.group_size, dim=0)  # [Hq, D]
        return planted[None, :, None, :].expand_as(query).to(query.dtype).contiguous()

    def found(self, chosen: set[str], candidates: list[str]) -> float:
        """Fraction of the span's tokens inside the chosen units."""
        hit = sum(len(r) for cid, ranges in zip(candidates, self.ranges, strict=True) if cid in chosen for r in ranges)
        return hit / self.span_tokens

    def span_mask(self, sizes: list[int], device: torch.device) -> torch.Tensor:
        """``[sum(sizes)]`` bool over the history in candidate order: True on the span's tokens."""
        mask = torch.zeros(sum(sizes), dtype=torch.bool)
        offset = 0
        for size, ranges in zip(sizes, self.ranges, strict=True):
            for r in ranges:
                mask[offset + r.start : offset + r.stop] = True
            offset += size
        return mask.to(device)


def next_token_kl(model, reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(p_ref || p_other), in nats, of the next-token distributions two last hidden states ``[hidden]`` give."""
    both = torch.stack([reference, other]).to(model.device, model.dtype)
    logp = torch.log_softmax(model.logits(both).float(), dim=-1)
    return max(0.0, float((logp[0].exp() * (logp[0] - logp[1])).sum()))


def probe_spans(num_stored_frames: int, num_probes: int, span_frames: int) -> list[tuple[int, int]]:
    """``num_probes`` spans of ``span_frames`` frames spread evenly over the first ``num_stored_frames`` frames."""
    room = max(1, num_stored_frames - span_frames)
    starts = [room * (2 * i + 1) // (2 * num_probes) for i in range(num_probes)]
    return [(a, a + span_frames - 1) for a in starts]
