"""Side-by-side fidelity of the three retrieval modes on one model, one stream, several budgets.

For each budget, every mode ingests the same frames into its own engine (sharing one model), answers the same
questions, and is compared with ``full``:
- attention recall of the retrieved set against an oracle top-k of full attention at the same budget;
- relative error of the question's last hidden state against ``full``;
- bytes moved to the device, and the number of copy operations, per question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mosaic_core.config import EngineConfig, RetrievalMode
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

DEFAULT_QUESTIONS = (
    "When did the cyclist pass the camera?",
    "What happened at the start of the video?",
    "Summarise the last few seconds.",
)


@dataclass(slots=True)
class FidelityRow:
    budget_tokens: int
    mode: str
    attention_recall: float
    hidden_rel_error: float
    bytes_per_question: float
    copies_per_question: float
    clusters: int


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
    total = len(budgets) * len(RetrievalMode) * (num_batches + len(questions))
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
            engine = Engine(model, config)
            stream_id = frames[0].stream_id
            engine.open_stream(stream_id)
            for i in range(0, len(frames), batch_frames):
                engine.ingest(frames[i : i + batch_frames])
                step(f"{where}: ingesting")
            answers = []
            for question in questions:
                answers.append(engine.answer(stream_id, question, max_new_tokens=1, measure_recall=True))
                step(f"{where}: questions")
            hidden = [a.last_hidden for a in answers]
            if mode is RetrievalMode.FULL:
                reference = hidden
            errors = [
                float(torch.linalg.vector_norm(h - r) / torch.linalg.vector_norm(r))
                for h, r in zip(hidden, reference, strict=True)
            ]
            rows.append(
                FidelityRow(
                    budget_tokens=budget,
                    mode=mode.value,
                    attention_recall=_mean([a.retrieval.attention_recall or 0.0 for a in answers]),
                    hidden_rel_error=_mean(errors),
                    bytes_per_question=_mean([a.retrieval.bytes_fetched for a in answers]),
                    copies_per_question=_mean([a.retrieval.num_copies for a in answers]),
                    clusters=len(engine.clusters(stream_id)),
                )
            )
    return rows


def format_table(rows: Sequence[FidelityRow]) -> str:
    header = (
        f"{'budget':>7} {'mode':>8} {'recall':>7} {'hidden rel err':>15} {'bytes/question':>15} "
        f"{'copies/question':>16} {'units':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.budget_tokens:>7} {r.mode:>8} {r.attention_recall:>7.3f} {r.hidden_rel_error:>15.2e} "
            f"{r.bytes_per_question:>15,.0f} {r.copies_per_question:>16.1f} {r.clusters:>6}"
        )
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
