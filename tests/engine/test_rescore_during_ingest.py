"""Re-scoring between decode steps while frames keep arriving: a frame that leaves the window joins its cluster,
but the plan already reads it through its snapshot of the window, and the budget was cut with the clusters' sizes
at the question. A re-scored table must hold each slot once and stay within the budget, and the answer must be the
one the same question gets with no frames arriving."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.engine import plans
from mosaic_core.engine.plans import QuestionPlan
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.tiering import DeviceRoom
from mosaic_core.memory.transfer import NOTHING_PENDING
from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens

QUESTION = "What happened?"
# One cluster takes frames until 96 tokens (any similarity joins), so frames leaving the window grow it; 120 budget
# tokens hold some of the clusters, not all.
RESCORED = dict(
    rescore_every_tokens=1,
    formation=FormationConfig(max_tokens=96, min_similarity=-1.0, min_cohesion=-1.0),
)


def _tables_seen(monkeypatch) -> list[tuple[int, int, np.ndarray, int]]:
    """(step, layer, retrieved slots, past tokens) of every table a plan builds."""
    seen = []
    rebuild = QuestionPlan._rebuild

    def recording(self, layer, selection, shared=None):
        rebuild(self, layer, selection, shared)
        static = self.tables[layer][0, : self.static_tokens[layer]].cpu().numpy()
        seen.append((self.steps, layer, static, len(self.past_slots)))

    monkeypatch.setattr(plans.QuestionPlan, "_rebuild", recording)
    return seen


def _asked_then_fed(engine, bikes_frames, *, max_new_tokens: int):
    """The question asked after 13 frames, with two frames arriving after each of its first tokens."""
    answer = engine.ask("cam", QUESTION, max_new_tokens=max_new_tokens)
    tokens = [next(answer).token_id]
    for start in range(13, 19, 2):
        feed(engine, "cam", bikes_frames[start : start + 2], batch=2)
        tokens.append(next(answer).token_id)
    return tokens + [event.token_id for event in answer if hasattr(event, "token_id")]


@pytest.mark.parametrize("mode", ["cluster", "frame"])
@pytest.mark.parametrize("budget", [120, 400])
def test_a_rescored_table_reads_each_slot_once_within_the_budget(tiny_model, bikes_frames, monkeypatch, mode, budget):
    engine = make_engine(tiny_model, mode=mode, retrieval_budget_tokens=budget, **RESCORED)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:13])
    seen = _tables_seen(monkeypatch)
    _asked_then_fed(engine, bikes_frames, max_new_tokens=6)
    assert engine.stream_stats("cam").frames_ingested == 19
    assert any(step > 1 for step, *_ in seen), "no re-score after frames arrived"
    for step, layer, static, past in seen:
        assert len(np.unique(static)) == len(static), f"step {step} layer {layer}: a slot read twice"
        assert len(static) - past <= budget, f"step {step} layer {layer}: {len(static) - past} > {budget} tokens"


@pytest.mark.parametrize("budget", [120, 400])
def test_frames_arriving_between_rescores_leave_the_answer_as_it_was(tiny_model, bikes_frames, monkeypatch, budget):
    reference = make_engine(tiny_model, retrieval_budget_tokens=budget, **RESCORED)
    reference.open_stream("cam")
    feed(reference, "cam", bikes_frames[:13])
    hiddens = record_hiddens(tiny_model, monkeypatch)  # every step's: the tiny preset repeats one token
    expected = reference.answer("cam", QUESTION, max_new_tokens=6).token_ids
    expected_hiddens = list(hiddens)

    engine = make_engine(tiny_model, retrieval_budget_tokens=budget, **RESCORED)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:13])
    hiddens.clear()
    assert _asked_then_fed(engine, bikes_frames, max_new_tokens=6) == expected
    assert_same_hiddens(hiddens, expected_hiddens)


def test_a_pass_that_raises_waits_for_the_staging_it_queued_before_its_pages_go(tiny_model, bikes_frames, monkeypatch):
    """The anchor queues every later layer's staging at once; a pass that raises before those layers run must make
    the compute stream wait for those copies before the staging pages go back. Off CUDA a wait orders nothing: this
    checks that each move the question queued is waited for before its room is released."""
    # most clusters on the host, so staging is queued; eager layers (on CUDA too), so the failing write runs
    engine = make_engine(tiny_model, device_budget_bytes=1 << 20, prefill_graphs=False)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:40])
    queued, waited, waited_at_release = [], [], []
    stage_pages = Retriever._stage_pages

    def recording_stage(self, *args, **kwargs):
        moves = stage_pages(self, *args, **kwargs)
        queued.extend(moves)
        return moves

    release = DeviceRoom.release

    def recording_release(self):
        waited_at_release.append(list(waited))
        release(self)

    write = QuestionPlan._write
    anchor = engine.config.prefetch_after_layer

    def failing_write(self, layer, kv):
        if layer == anchor:  # after the anchor chose and queued the later layers' staging
            raise RuntimeError("injected")
        write(self, layer, kv)

    monkeypatch.setattr(Retriever, "_stage_pages", recording_stage)
    monkeypatch.setattr(engine.tiering.tiers.transfers, "wait", waited.append)
    monkeypatch.setattr(DeviceRoom, "release", recording_release)
    monkeypatch.setattr(QuestionPlan, "_write", failing_write)
    with pytest.raises(RuntimeError, match="injected"):
        engine.answer("cam", QUESTION, max_new_tokens=2)
    pending = [moved for moved in queued if moved is not NOTHING_PENDING]
    assert len(pending) > 1, "no staging queued past the anchor"
    assert len(waited_at_release) == 1
    assert all(any(moved is w for w in waited_at_release[0]) for moved in pending)


def test_frames_leaving_the_window_before_the_first_pass_stay_in_the_answers_context(
    tiny_model, bikes_frames, monkeypatch
):
    """Asked, then frames ingested before the answer is read: the plan's window snapshot no longer holds the frames
    that left, so their clusters are read at their sizes then, as a question asked after those frames reads them.
    (A budget that holds every cluster: the centroids the clusters are ranked by stay those of the question.)"""
    budget = 400
    reference = make_engine(tiny_model, retrieval_budget_tokens=budget, **RESCORED)
    reference.open_stream("cam")
    feed(reference, "cam", bikes_frames[:15])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    expected = reference.answer("cam", QUESTION, max_new_tokens=4).token_ids
    expected_hiddens = list(hiddens)

    engine = make_engine(tiny_model, retrieval_budget_tokens=budget, **RESCORED)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:13])
    answer = engine.ask("cam", QUESTION, max_new_tokens=4)
    feed(engine, "cam", bikes_frames[13:15], batch=2)
    assert [c.cluster_id for c in engine.clusters("cam")] == [c.cluster_id for c in reference.clusters("cam")]
    hiddens.clear()
    tokens = [event.token_id for event in answer if hasattr(event, "token_id")]
    assert tokens == expected
    assert_same_hiddens(hiddens, expected_hiddens)
