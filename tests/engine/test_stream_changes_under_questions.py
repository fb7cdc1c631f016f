"""A stream's clusters change while one of its questions is under way: retention drops a candidate it did not
choose between two decode steps, or a caller closes the stream. The question's pins keep what it reads; the rest
must neither break it nor be half done."""

from __future__ import annotations

import pytest

from mosaic_core.engine.results import Answer
from mosaic_core.errors import StateError
from tests.engine.engine_helpers import feed, make_engine


def test_retention_between_decode_steps_does_not_break_a_rescoring_question(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, rescore_every_tokens=1)
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    question = engine.ask("cam", "what moved?", max_new_tokens=8)
    next(question)  # prefill done: the chosen clusters are pinned, the others are candidates still
    residency = engine.tiering.residency
    pinned = {c for c in residency.clusters("cam") if residency.record_to_read(c).pinned}
    dropped = engine.drop_clusters_before("cam", 1e9)  # retention: every unpinned sealed cluster goes
    assert dropped, "retention had nothing to drop; the test shows nothing"
    assert not (set(dropped) & pinned)
    events = list(question)  # the next re-scores must not choose the dropped clusters
    assert isinstance(events[-1], Answer)


def test_a_stream_a_question_reads_is_not_closed_and_nothing_of_it_changes(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path / "data"))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:24])
    clusters = [c.cluster_id for c in engine.clusters("cam")]
    question = engine.ask("cam", "what moved?", max_new_tokens=8)
    next(question)  # its prefill pinned what it reads
    with pytest.raises(StateError, match="cannot be closed while a question reads it"):
        engine.close_stream("cam")
    state = engine.streams["cam"]
    assert not state.closed and [c.cluster_id for c in engine.clusters("cam")] == clusters
    assert (tmp_path / "data" / "cam").exists() and engine.history.store.owns(clusters[0])  # history not trashed
    assert isinstance(list(question)[-1], Answer)  # the question ends as if nothing happened
    engine.close_stream("cam")  # and then the stream closes
    assert "cam" not in engine.streams and not (tmp_path / "data" / "cam").exists()
    engine.close()
