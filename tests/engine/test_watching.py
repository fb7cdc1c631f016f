"""Watch scoring on the engine (mosaic_core/engine/watching.py), against the retriever's own scorer.

``test_summary_scores_equal_the_retrievers_per_layer_scores`` is the guard for the engine internals the watch
scorer reads (summary index, sink and window, model forward with a plan): if they move, it fails.
"""

from __future__ import annotations

import pytest
import torch

from mosaic_core.engine.scorers import scorer_by_name
from mosaic_core.engine.watching import WatchScorer, question_queries, summary_scores
from tests.engine.engine_helpers import feed, make_engine

QUESTION = "Is a cyclist passing the camera?"


@pytest.fixture(scope="module")
def engine(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    assert len(engine.clusters("cam")) >= 4
    return engine


def test_summary_scores_equal_the_retrievers_per_layer_scores(engine):
    ids = [c.cluster_id for c in engine.clusters("cam")]
    (queries,), cursor = question_queries(engine, "cam", [QUESTION])
    num_tokens = len(engine.model.question_ids(QUESTION))
    assert cursor == engine.stream("cam").text_cursor
    assert queries.shape == (engine.spec.num_layers, engine.spec.num_q_heads, num_tokens, engine.spec.head_dim)
    got = summary_scores(engine, "cam", ids, queries[None])[0]  # [L, C]
    mean, var, log_count = engine.tiering.summaries.all_layers(ids)
    for layer in range(engine.spec.num_layers):
        want = scorer_by_name("spread").scores(
            queries[layer], mean[:, layer], var[:, layer], log_count, scale=engine.spec.scale
        )
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-4)


def test_batched_watches_score_as_each_alone_and_padding_changes_nothing(engine):
    ids = [c.cluster_id for c in engine.clusters("cam")[:-1]]
    scorer = WatchScorer(engine)
    short, long = "Cyclist?", "Is there a red truck parked at the north gate of the depot right now?"
    together = scorer.score("cam", ids, [short, long])  # one prefill of two padded rows
    alone = WatchScorer(engine).score("cam", ids, [short]) + WatchScorer(engine).score("cam", ids, [long])
    assert [s.lift for s in together] == pytest.approx([s.lift for s in alone], abs=1e-4)
    assert [(s.question, s.cluster_id) for s in together] == [(q, c) for q in (short, long) for c in ids]
    scorer.score("cam", ids, [long, short])
    assert scorer.num_prefills == 1  # both questions prefilled together once, then cached


def test_lift_is_relative_to_the_history_before_the_cluster(engine):
    ids = [c.cluster_id for c in engine.clusters("cam")[:-1]]
    lifts = [s.lift for s in WatchScorer(engine).score("cam", ids, [QUESTION])]
    assert lifts[0] == pytest.approx(0.0, abs=1e-6)  # the first cluster is its own history
    assert any(abs(x) > 1e-6 for x in lifts[1:])
    # A cluster's lift does not depend on which clusters are scored with it, nor on later clusters.
    alone = WatchScorer(engine).score("cam", ids[2:3], [QUESTION])[0].lift
    assert alone == pytest.approx(lifts[2], abs=1e-6)


def test_requery_after_the_stream_moved_far_and_forget(engine):
    scorer = WatchScorer(engine, requery_positions=1)
    ids = [engine.clusters("cam")[0].cluster_id]
    scorer.score("cam", ids, [QUESTION])
    scorer.score("cam", ids, [QUESTION])
    assert scorer.num_prefills == 1  # the stream did not move
    scorer.forget(stream_id="cam")
    scorer.score("cam", ids, [QUESTION])
    assert scorer.num_prefills == 2


def test_scored_layers_and_the_cache_bound(engine):
    from mosaic_core.engine.watching import scored_layers

    assert scored_layers(28, 8) == [0, 4, 8, 12, 15, 19, 23, 27] and scored_layers(3, 8) == [0, 1, 2]
    ids = [engine.clusters("cam")[1].cluster_id]
    one = WatchScorer(engine).score("cam", ids, ["A?"])[0].lift
    scorer = WatchScorer(engine, max_cache_bytes=1)  # nothing fits: every score prefills again, same result
    assert scorer.score("cam", ids, ["A?"])[0].lift == pytest.approx(one, abs=1e-6)
    scorer.score("cam", ids, ["A?"])
    assert (scorer.num_prefills, scorer.cache_bytes) == (2, 0)
    roomy = WatchScorer(engine)
    roomy.score("cam", ids, ["A?", "Is a long question padded in its batch?"])
    # Each cached entry keeps only its own row alive, not the batch it was prefilled in.
    kept = [q.untyped_storage().nbytes() for q, _ in roomy._queries.values()]
    assert kept == [q.numel() * q.element_size() for q, _ in roomy._queries.values()]
    assert roomy.cache_bytes == sum(kept)
    roomy = WatchScorer(engine)
    roomy.score("cam", ids, ["A?", "B?"])
    per_question = roomy.cache_bytes // 2
    small = WatchScorer(engine, max_cache_bytes=per_question + 1)  # room for one question's queries
    small.score("cam", ids, ["A?", "B?"])
    small.score("cam", ids, ["B?"])  # B is the one kept
    assert small.num_prefills == 1 and small.cache_bytes == per_question
    small.score("cam", ids, ["A?"])
    assert small.num_prefills == 2
    assert small.num_evicted == 2  # A for B, then B for A
    assert roomy.num_evicted == 0


def test_refuses_clusters_without_kv(engine):
    with pytest.raises(KeyError, match="hold no KV"):
        WatchScorer(engine).score("cam", ["cam/c999999"], [QUESTION])
    with pytest.raises(ValueError, match="requery_positions"):
        WatchScorer(engine, requery_positions=0)


def test_captured_queries_are_the_queries_the_question_path_computes(tiny_model, bikes_frames, monkeypatch):
    """Checked against the engine's own question path, not against the watch scorer: layer 0's queries depend only
    on the question's tokens and positions, which the capture must reproduce (padding and batching included).
    Later layers read the retrieved clusters, which the capture leaves out by design."""
    from mosaic_core.engine.plans import QuestionPlan

    # Its own engine (asking may merge clusters the module's engine keeps), with the question's layers run eagerly:
    # on CUDA a prefill graph's replay never calls the Python ``attend`` recorded below.
    engine = make_engine(tiny_model, prefill_graphs=False)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:8])
    short, long = "Cyclist?", "Is there a red truck parked at the north gate of the depot right now?"
    captured, cursor = question_queries(engine, "cam", [long, short])  # the short row is padded in its batch
    seen: dict[int, torch.Tensor] = {}
    attend = QuestionPlan.attend

    def recording_attend(self, layer_idx, query, key, value, scale):
        seen.setdefault(layer_idx, query[0].clone())  # the first call per layer is the question's prefill
        return attend(self, layer_idx, query, key, value, scale)

    monkeypatch.setattr(QuestionPlan, "attend", recording_attend)
    assert engine.stream("cam").text_cursor == cursor
    list(engine.ask("cam", short, max_new_tokens=1))
    want = seen[0]  # [Hq, T, D]
    assert captured[1][0].shape == want.shape
    torch.testing.assert_close(captured[1][0], want.to(captured[1].dtype), rtol=1e-3, atol=1e-3)
