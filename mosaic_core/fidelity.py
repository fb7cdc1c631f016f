"""Side-by-side fidelity of the three retrieval modes on one model, one stream, several budgets.

For each budget, every mode ingests the same frames into its own engine (sharing one model), answers the same
questions, and is compared with ``full``:
- attention recall of the retrieved set against an oracle top-k of full attention at the same budget;
- relative error of the question's last hidden state against ``full``;
- bytes moved to the device, and the number of copy operations, per question;
- next-token KL(full || mode);
- recall against chance: what a random and a most-recent choice, and the other key scorers (mean key for
  clusters, spread for frame blocks, and for both the per-token attention share, ``spread_share_per_token``), would
  have retrieved over the same units for the same queries;
- planted-attention probes (``mosaic_core.engine.probes``): the fraction of a planted span each choice finds.

With random weights (the presets) attention is nearly uniform, so recall barely separates any scorer from chance;
only the planted probes measure retrieval precision then. A real checkpoint (``--model PATH``) is needed for what
real questions attend to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mosaic_core.config import EngineConfig, RetrievalMode
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.probes import ENGINE, ProbeRequest, next_token_kl, probe_spans, probing
from mosaic_core.engine.results import FrameInput
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

DEFAULT_QUESTIONS = (
    "When did the cyclist pass the camera?",
    "What happened at the start of the video?",
    "Summarise the last few seconds.",
)
SWEEP = ("spread", "spread_share_per_token", "mean_key", "random", "recent")
NUM_PROBES = 3


@dataclass(slots=True)
class FidelityRow:
    budget_tokens: int
    mode: str
    attention_recall: float | None
    hidden_rel_error: float
    bytes_per_question: float
    copies_per_question: float
    clusters: int
    kl_vs_full: float = 0.0
    recall_by_scorer: dict[str, float] = dataclasses.field(default_factory=dict)
    probe_found_by_scorer: dict[str, float] = dataclasses.field(default_factory=dict)
    probe_span_mass: float | None = None


@dataclass(slots=True)
class _ModeRun:
    """One mode's engine at one budget: its stream, the questions' answers, each question's recall by scorer, the
    planted probes, and the stream's clusters at the end (the engine is gone by the time its row is made)."""

    stream_id: str
    answers: list
    sweeps: list
    probes: list[ProbeRequest]
    num_clusters: int

    @property
    def last_hidden(self) -> list[torch.Tensor]:
        return [a.last_hidden for a in self.answers]


def run_fidelity(
    model: Qwen25VLAdapter,
    frames: Sequence[FrameInput],
    *,
    base: EngineConfig,
    budgets: Sequence[int],
    questions: Sequence[str] = DEFAULT_QUESTIONS,
    batch_frames: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[FidelityRow]:
    """Runs every mode at every budget; returns one row per (budget, mode).

    ``progress(done, total, note)`` is called after each ingest batch and each question (the steps that take
    the time), so a caller can show an ETA.
    """
    rows = []
    num_batches = -(-len(frames) // batch_frames)
    total = len(budgets) * len(RetrievalMode) * (num_batches + len(questions) + NUM_PROBES)
    done = 0

    def step(note: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, note)

    if progress:
        progress(0, total, "starting")
    for budget in budgets:
        reference = None
        for mode in RetrievalMode:
            where = f"budget {budget} tokens, mode {mode.value}"
            config = dataclasses.replace(base, mode=mode, retrieval_budget_tokens=budget)
            run = _mode_run(model, config, frames, questions, batch_frames, where=where, step=step)
            if mode is RetrievalMode.FULL:
                reference = run.last_hidden
            rows.append(_fidelity_row(model, run, budget=budget, mode=mode, reference=reference))
    return rows


def _mode_run(
    model: Qwen25VLAdapter,
    config: EngineConfig,
    frames: Sequence[FrameInput],
    questions: Sequence[str],
    batch_frames: int,
    *,
    where: str,
    step: Callable[[str], None],
) -> _ModeRun:
    """One mode's run at one budget, on an engine of its own that is closed and dropped on return, before the caller
    builds the next: its device pool and pinned host chunk go back to torch's caching allocators then, for the next
    engine to reuse, rather than being held while it makes its own (a ``close`` stops the engine's threads but frees
    no memory, and a local of ``run_fidelity`` would hold the engine until rebound)."""
    engine = Engine(model, config)
    try:
        return _ask_and_probe(engine, frames, config, questions, batch_frames, where=where, step=step)
    finally:
        engine.close()


def _ask_and_probe(
    engine: Engine,
    frames: Sequence[FrameInput],
    base: EngineConfig,
    questions: Sequence[str],
    batch_frames: int,
    *,
    where: str,
    step: Callable[[str], None],
) -> _ModeRun:
    """Ingests ``frames`` into a fresh ``engine``, asks every question (one token, every scorer's recall swept) and
    the planted probes, calling ``step`` after each batch, question and probe with a note that starts with ``where``."""
    stream_id = frames[0].stream_id
    engine.open_stream(stream_id)
    for i in range(0, len(frames), batch_frames):
        engine.ingest(frames[i : i + batch_frames])
        step(f"{where}: ingesting")
    answers, sweeps = [], []
    for question in questions:
        with probing(ProbeRequest(sweep_scorers=SWEEP)) as request:
            answers.append(engine.answer(stream_id, question, max_new_tokens=1, measure_recall=True))
        sweeps.append(request.recall)
        step(f"{where}: questions")
    probes = []
    window_frames = base.local_window_tokens // max(1, engine.stream_stats(stream_id).tokens_per_frame or 1)
    for span in probe_spans(len(frames) - window_frames - 1, NUM_PROBES, span_frames=2):
        with probing(ProbeRequest(span=span, sweep_scorers=SWEEP)) as request:
            engine.answer(stream_id, "Planted probe.", max_new_tokens=1)
        probes.append(request)
        step(f"{where}: planted probes")
    return _ModeRun(stream_id, answers, sweeps, probes, num_clusters=len(engine.clusters(stream_id)))


def _fidelity_row(
    model: Qwen25VLAdapter, run: _ModeRun, *, budget: int, mode: RetrievalMode, reference: list
) -> FidelityRow:
    """The row of one mode at one budget, its answers' last hidden states compared with ``reference`` (full's)."""
    answers, probes, hidden = run.answers, run.probes, run.last_hidden
    errors = [
        float(torch.linalg.vector_norm(h - r) / torch.linalg.vector_norm(r))
        for h, r in zip(hidden, reference, strict=True)
    ]
    return FidelityRow(
        budget_tokens=budget,
        mode=mode.value,
        attention_recall=_mean_or_none([a.retrieval.attention_recall for a in answers]),
        hidden_rel_error=_mean(errors),
        bytes_per_question=_mean([a.retrieval.bytes_fetched for a in answers]),
        copies_per_question=_mean([a.retrieval.num_copies for a in answers]),
        clusters=run.num_clusters,
        kl_vs_full=_mean([next_token_kl(model, r, h) for h, r in zip(hidden, reference, strict=True)]),
        recall_by_scorer=_mean_by_key(run.sweeps),
        probe_found_by_scorer=_mean_by_key([p.span_found for p in probes]),
        probe_span_mass=_mean_or_none([p.span_mass for p in probes]),
    )


def format_table(rows: Sequence[FidelityRow]) -> str:
    header = (
        f"{'budget':>7} {'mode':>8} {'recall':>7} {'random':>7} {'recent':>7} {'other':>7} {'probe':>6} "
        f"{'p.rand':>6} {'hidden rel err':>15} {'KL vs full':>11} {'bytes/question':>15} {'copies/question':>16} "
        f"{'units':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        other = "mean_key" if r.mode == "cluster" else "spread"
        recall, found = r.recall_by_scorer, r.probe_found_by_scorer
        lines.append(
            f"{r.budget_tokens:>7} {r.mode:>8} {_cell(r.attention_recall, 7)} {_cell(recall.get('random'), 7)} "
            f"{_cell(recall.get('recent'), 7)} {_cell(recall.get(other), 7)} {_cell(found.get(ENGINE), 6, 2)} "
            f"{_cell(found.get('random'), 6, 2)} {r.hidden_rel_error:>15.2e} {r.kl_vs_full:>11.2e} "
            f"{r.bytes_per_question:>15,.0f} {r.copies_per_question:>16.1f} {r.clusters:>6}"
        )
    masses = [r.probe_span_mass for r in rows if r.probe_span_mass is not None]
    lines += [
        "",
        "recall: attention recall vs an oracle top-k; random / recent / other: the same measure for a random choice,",
        "the newest units, and the other key scorer (mean key for clusters, spread for frame blocks) over the same",
        "units and queries. probe / p.rand: fraction of a planted span found by the mode's own choice / at random",
        f"(the planted span got {min(masses, default=0):.2f}-{max(masses, default=0):.2f} of full attention).",
        "With random weights attention is nearly uniform, so recall barely separates any scorer from chance;",
        "only the planted probes measure precision. Real questions need a real checkpoint: --model PATH.",
    ]
    return "\n".join(lines)


def _cell(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _mean_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _mean_by_key(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: _mean([d[k] for d in dicts if k in d]) for k in sorted(keys)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
