"""Standing questions, engine side: score a sealed cluster against many watch questions in one pass.

A watch question is turned once into its per-layer query vectors (the "embedding"): the question is prefilled
over the stream's sink and local window only, and each layer's post-RoPE queries are kept. A sealed cluster is
then scored against every watch on its stream with the same key-summary estimate the retriever uses
(``log n + s q.mu + 1/2 s^2 sum_d q_d^2 var_d``), batched over watches and clusters, one einsum per layer.

The score a watch sees is the cluster's **lift** in nats: how much more attention per token the question's
queries would give the cluster than the stream's history up to it on average (every cluster holding KV that
ended no later than ``c``), mean over the scored layers (up to ``MAX_SCORED_LAYERS``, evenly spaced):

    lift_l(c) = (s_l(c) - log n_c) - (logsumexp_j s_l(j) - log sum_j n_j)       s_l: per-layer summary score
    lift(c)   = mean_l lift_l(c)

Cached queries are bounded in bytes (least recently used dropped first): at the 7B shape one (stream, question)
pair is about 1 MiB (8 layers x 28 heads x ~20 tokens x 128 x 2 bytes).

0 means "as relevant as the average history"; a watch fires above its threshold. With random weights (the shape
presets) the lift is meaningful only relative to other clusters of the same stream; with a real checkpoint it
says how strongly the question's attention singles the cluster out.

Engine internals read here (summaries, sink and window, positions, the model's forward with a plan) are kept in
the two functions ``question_queries`` and ``summary_scores`` so they are easy to re-point after refactors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mosaic_core.engine.attend import causal_mask
from mosaic_core.memory.transfer import upload

log = logging.getLogger(__name__)

# Queries are recomputed once the stream's text position has moved this far from where they were taken: RoPE
# makes a query's fit to new keys depend on their distance, so a very old query drifts.
REQUERY_POSITIONS = 4096
QUESTIONS_PER_PREFILL = 16  # rows of one batched question prefill
MAX_SCORED_LAYERS = 8  # layers a watch is scored on, evenly spaced, the last included
MAX_CACHE_BYTES = 1 << 30  # cached question queries per worker; least recently used ones are dropped beyond


def scored_layers(num_layers: int, max_layers: int = MAX_SCORED_LAYERS) -> list[int]:
    """Up to ``max_layers`` layer indices spread evenly from the first to the last."""
    if num_layers <= max_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (max_layers - 1)) for i in range(max_layers)})


@dataclass(frozen=True, slots=True)
class WatchScore:
    """One (watch question, cluster) score."""

    question: str
    cluster_id: str
    lift: float


@dataclass(frozen=True, slots=True)
class SealedSpan:
    """The part of a sealed cluster that no watch has evaluated yet: its frames after the stream's watermark. A
    recurring-scene join or a merge can add unevaluated frames to a cluster whose others were evaluated before; the
    score still reads the whole cluster (its KV has one summary), but the event and its answer cover this part."""

    cluster_id: str
    stream_id: str
    start_s: float
    end_s: float


@dataclass(slots=True)
class WatchFrontier:
    """How far one stream's watch evaluation has got, found without listing its whole history on every pass.

    Every frame holding KV stamped at or before ``watermark_s`` has been evaluated, and none after it. Frames are
    stored in time order, so the cluster that holds the newest stored frame is the only one that may still grow (or
    be joined or merged before a later frame is stored): it waits; every other cluster with frames after the
    watermark is sealed and whole, and is evaluated, after which the watermark is the latest end among them.

        stored frames:  1 2 3 4 5 6 | 7 8 9 (window)     clusters: A={1,2} B={3,4} C={5,6}, watermark after 4
        C completes and joins A:    A+C={1,2,5,6}  B={3,4}   A+C holds frames after 4: evaluated for 5-6 (as soon
                                                            as a frame of the next cluster is stored)

    A join, merge or split makes a record with a new id from the former's counter, so the clusters to look at are
    the ones numbered since the last look, plus those seen then but left (still growing, or holding no KV yet).
    """

    watermark_s: float = float("-inf")
    next_number: int | None = None  # the former's id counter at the last look; None: list every record once
    pending: set[str] = field(default_factory=set)  # seen with frames after the watermark, not evaluated

    def sealed(self, engine, stream_id: str) -> list[SealedSpan]:
        """The stream's sealed clusters holding frames after the watermark, each as the part after it, in time
        order; the frontier remembers the rest for the next look. Reads engine internals (the former's records and
        id counter, the residency index)."""
        former = engine.stream(stream_id).former
        if self.next_number is None or former.next_number < self.next_number:  # (a former it never looked at)
            ids = [r.cluster_id for r in former.records_to_read() if r.end_s > self.watermark_s]
        else:
            ids = [*self.pending, *former.ids_numbered(range(self.next_number, former.next_number))]
        self.next_number = former.next_number
        self.pending, held = set(), []
        for cluster_id in ids:
            record = former.record_to_read(cluster_id)
            # None: joined, merged or split into a record numbered since (among ``ids``), or dropped by retention
            if record is None or record.end_s <= self.watermark_s:
                continue
            self.pending.add(cluster_id)
            if cluster_id in engine.tiering.residency:
                held.append(record)
        if not held:
            return []
        growing = max(held, key=_end)  # holds the newest stored frame
        spans = [
            SealedSpan(r.cluster_id, stream_id, min((t for t in r.frame_timestamps_s if t > self.watermark_s),
                                                    default=r.start_s), r.end_s)
            for r in held
            if r is not growing
        ]  # fmt: skip
        return sorted(spans, key=lambda span: span.start_s)

    def advance(self, spans: Sequence[SealedSpan]) -> None:
        """``spans`` (from ``sealed``) were evaluated: the watermark moves to their latest end."""
        self.pending.difference_update(span.cluster_id for span in spans)
        self.watermark_s = max([self.watermark_s, *(span.end_s for span in spans)])


def _end(record) -> float:
    return record.end_s


class _CapturePlan:
    """Prefills questions (one per row) over sink + local window and keeps each layer's queries ``[B, Hq, T, D]``."""

    def __init__(self, stream, num_layers: int, keep: set[int]) -> None:
        self.stream = stream
        self.keep = keep
        self.queries: list[torch.Tensor | None] = [None] * num_layers

    def attend(self, layer_idx, query, key, value, scale):
        """Every row over the shared past and its own tokens, in one attention call for the batch (a loop over
        rows cost 16 attention launches and KV copies per layer: at the 7B shape, 100 watches took about 1 s
        of the engine thread per sealed cluster)."""
        if layer_idx in self.keep:
            self.queries[layer_idx] = query.clone()
        keys, values = key, value  # [B, H, T, D]
        past = self.stream.past_layer(layer_idx)  # [2, H, S, D]
        if past is not None:
            shared = past.to(key.dtype)[:, None].expand(-1, key.shape[0], -1, -1, -1)  # [2, B, H, S, D]
            keys, values = torch.cat([shared[0], key], dim=2), torch.cat([shared[1], value], dim=2)
        mask = causal_mask(key.shape[2], keys.shape[2], query.device)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)  # [B, T, Hq, D]


def question_queries(
    engine, stream_id: str, questions: Sequence[str], layers: Sequence[int] | None = None
) -> tuple[list[torch.Tensor], int]:
    """Post-RoPE queries of each question on ``stream_id`` in ``layers`` (None: all), ``[len(layers), Hq, T_i, D]``
    in the model's dtype, from batched forward passes of up to ``QUESTIONS_PER_PREFILL`` questions, and the text
    position they were taken at. Reads engine internals (stream state, model forward with a plan).

    Rows are padded at the end by repeating their last token; attention is causal, so padding never changes a
    question's own tokens, and only those are kept."""
    state = engine.stream(stream_id)
    model = engine.model
    cursor = state.text_cursor
    layers = list(range(engine.spec.num_layers)) if layers is None else list(layers)
    out: list[torch.Tensor] = []
    for first in range(0, len(questions), QUESTIONS_PER_PREFILL):
        ids = [model.question_ids(q) for q in questions[first : first + QUESTIONS_PER_PREFILL]]
        longest = max(len(row) for row in ids)
        padded = [row + [row[-1]] * (longest - len(row)) for row in ids]
        plan = _CapturePlan(state, engine.spec.num_layers, set(layers))
        positions = model.text_positions(cursor, longest)[:, None].expand(-1, len(ids), -1)  # [3, B, T]
        with torch.no_grad():
            model.forward(input_ids=upload(padded, torch.long, model.device), position_ids=positions, plan=plan)
        stacked = torch.stack([plan.queries[layer] for layer in layers], dim=1)  # [B, len(layers), Hq, T, D]
        # A slice of ``stacked`` would keep the whole batch alive in the scorer's cache: copy each row out.
        out += [stacked[b, :, :, : len(row)].clone(memory_format=torch.contiguous_format) for b, row in enumerate(ids)]
    return out, cursor


def summary_scores(
    engine, stream_id: str, cluster_ids: list[str], queries: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-layer summary scores ``[W, L, C]`` of clusters for ``W`` watch queries ``[W, L, Hq, T, D]`` taken in
    ``layers`` (None: every layer).

    The same estimate as the retriever's ``spread`` scorer (``mosaic_core.engine.scorers``), batched over watches:
    per KV head the maximum over the head's query group and tokens, heads combined by log-sum-exp. Reads the
    engine's summary index (an engine internal)."""
    engine.stream(stream_id)  # raises for a stream that is not open
    spec = engine.spec
    mean, var, log_count = engine.tiering.summaries.all_layers(cluster_ids)  # [C, L, H, D] x2, [C]
    if layers is not None:
        mean, var = mean[:, list(layers)], var[:, list(layers)]
    num_w, num_l, num_q, num_t, dim = queries.shape
    num_kv = mean.shape[2]
    group = num_q // num_kv
    q = queries.to(mean.device, torch.float32).reshape(num_w, num_l, num_kv, group * num_t, dim)  # [W, L, H, G*T, D]
    dots = torch.einsum("wlhqd,clhd->wlchq", q, mean.float()) * spec.scale
    spread = torch.einsum("wlhqd,clhd->wlchq", q.square(), var.float()) * (0.5 * spec.scale * spec.scale)
    per_head = (dots + spread).amax(dim=4) + log_count.float()[None, None, :, None]  # [W, L, C, H]
    return torch.logsumexp(per_head, dim=3)


class WatchScorer:
    """Scores sealed clusters of a stream against many watch questions; caches each question's queries.

    Args:
        engine: the worker's engine (``mosaic_core.engine.engine.Engine``); called from its thread only.
        requery_positions: text positions after which a cached question is prefilled again.
        max_layers: layers scored (evenly spaced, the last included); the lift is their mean.
        max_cache_bytes: bound on the cached queries (on the engine's device); the least recently used
            (stream, question) pairs are dropped beyond it and prefilled again when next needed.
    """

    def __init__(
        self,
        engine,
        *,
        requery_positions: int = REQUERY_POSITIONS,
        max_layers: int = MAX_SCORED_LAYERS,
        max_cache_bytes: int = MAX_CACHE_BYTES,
    ) -> None:
        if requery_positions < 1 or max_layers < 1 or max_cache_bytes < 0:
            raise ValueError(
                f"requery_positions={requery_positions} and max_layers={max_layers} must be >= 1, "
                f"max_cache_bytes={max_cache_bytes} >= 0"
            )
        self.engine = engine
        self.requery_positions = requery_positions
        self.layers = scored_layers(engine.spec.num_layers, max_layers)
        self.max_cache_bytes = max_cache_bytes
        self._queries: OrderedDict[tuple[str, str], tuple[torch.Tensor, int]] = OrderedDict()
        self.cache_bytes = 0
        self.num_prefills = 0  # batched question prefills run so far
        self.num_evicted = 0  # cached pairs dropped to make room

    def forget(self, *, stream_id: str | None = None, question: str | None = None) -> None:
        """Drops cached queries of a stream, of a question, or (both None) all of them."""
        for key in list(self._queries):
            if (stream_id is None or key[0] == stream_id) and (question is None or key[1] == question):
                self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        queries, _ = self._queries.pop(key)
        self.cache_bytes -= queries.untyped_storage().nbytes()

    def score(self, stream_id: str, cluster_ids: Sequence[str], questions: Sequence[str]) -> list[WatchScore]:
        """Lift of every ``(question, cluster)`` pair, questions outer; clusters must hold KV on the stream."""
        if not cluster_ids or not questions:
            return []
        state = self.engine.stream(stream_id)
        records = [r for r in state.former.records_to_read() if r.cluster_id in self.engine.tiering.residency]
        index = {r.cluster_id: i for i, r in enumerate(records)}
        missing = [c for c in cluster_ids if c not in index]
        if missing:
            raise KeyError(f"clusters {missing} hold no KV on stream {stream_id!r}")
        history = [r.cluster_id for r in records]
        queries = _pad_tokens(self._queries_of(stream_id, questions))  # [W, L, Hq, T, D]
        scores = summary_scores(self.engine, stream_id, history, queries, self.layers)  # [W, L, C]
        _, _, log_count = self.engine.tiering.summaries.all_layers(history)
        log_count = log_count.float().to(scores.device)
        rows = upload([index[c] for c in cluster_ids], torch.long, scores.device)
        ends = torch.tensor([r.end_s for r in records], dtype=torch.float64)
        # [K, C]: the history of a scored cluster is every cluster that ended no later than it did, so a score
        # does not depend on how far ingest had got when the cluster was scored.
        before = (ends[None, :] <= ends[rows.cpu()][:, None]).to(scores.device)
        masked = scores[:, :, None, :].masked_fill(~before, float("-inf"))  # [W, L, K, C]
        counts = log_count[None, :].masked_fill(~before, float("-inf"))  # [K, C]
        history_norm = torch.logsumexp(masked, dim=3) - torch.logsumexp(counts, dim=1)[None, None, :]  # [W, L, K]
        lift = (scores[:, :, rows] - log_count[rows][None, None, :] - history_norm).mean(dim=1)  # [W, K]
        values = lift.cpu().tolist()  # [W, len(cluster_ids)]
        return [
            WatchScore(question, cluster_id, float(values[w][i]))
            for w, question in enumerate(questions)
            for i, cluster_id in enumerate(cluster_ids)
        ]

    def _queries_of(self, stream_id: str, questions: Sequence[str]) -> list[torch.Tensor]:
        """Cached queries of each question; the stale or missing ones come from one batched prefill."""
        cursor = self.engine.stream(stream_id).text_cursor
        found: dict[str, torch.Tensor] = {}
        stale = []
        for question in dict.fromkeys(questions):
            key = (stream_id, question)
            cached = self._queries.get(key)
            if cached is None or abs(cursor - cached[1]) > self.requery_positions:
                stale.append(question)
            else:
                self._queries.move_to_end(key)
                found[question] = cached[0]
        if stale:
            fresh, at = question_queries(self.engine, stream_id, stale, self.layers)
            self.num_prefills += 1
            for question, queries in zip(stale, fresh, strict=True):
                found[question] = queries
                self._remember((stream_id, question), queries, at)
        return [found[q] for q in questions]

    def _remember(self, key: tuple[str, str], queries: torch.Tensor, at: int) -> None:
        if key in self._queries:
            self._drop(key)
        size = queries.untyped_storage().nbytes()  # what the entry keeps alive, not what it shows
        while self._queries and self.cache_bytes + size > self.max_cache_bytes:
            self._drop(next(iter(self._queries)))  # least recently used first
            self.num_evicted += 1
            if self.num_evicted == 1:
                log.warning(
                    "the watch query cache (%d MiB) is full at %d (stream, question) pairs of about %.1f MiB each, "
                    "so pairs are dropped and prefilled again when next scored; with every camera watched, "
                    "cameras x watches pairs should fit (the worker's watch_query_cache_bytes)",
                    self.max_cache_bytes >> 20, len(self._queries) + 1, size / 2**20,
                )  # fmt: skip
        if size <= self.max_cache_bytes:
            self._queries[key] = (queries, at)
            self.cache_bytes += size


def _pad_tokens(queries: list[torch.Tensor]) -> torch.Tensor:
    """Stacks ``[L, Hq, T_w, D]`` queries of different lengths into ``[W, L, Hq, T, D]``.

    Padding repeats each question's last token: scores take the maximum over tokens, so a repeated token
    changes nothing."""
    longest = max(q.shape[2] for q in queries)
    padded = [
        q if q.shape[2] == longest else torch.cat([q, q[:, :, -1:].expand(-1, -1, longest - q.shape[2], -1)], 2)
        for q in queries
    ]
    return torch.stack(padded)
