"""The retrieval unit and the machinery are independent: frame blocks on cluster machinery, scorers by name,
transfer counting that means the same in every mode, and planted-attention probes that can tell a scorer from
chance."""

from __future__ import annotations

import pytest
import torch

from bench.synthetic_recall import case
from mosaic_core.config import MIB, EngineConfig
from mosaic_core.engine.machinery import layer_groups, machinery_for
from mosaic_core.engine.probes import ENGINE, UNIT_CEILING, ProbeRequest, probing
from mosaic_core.engine.recall_probe import densest_first
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.scorers import ShareScorer, scorer_by_name
from mosaic_core.errors import UnknownPolicyError
from tests.engine.engine_helpers import feed, make_engine

QUESTION = "When did the cyclist pass the camera?"
SPANS = [(2, 3), (9, 10), (15, 16), (21, 22), (26, 27)]  # stored frames (the window holds the newest ones)


@pytest.mark.parametrize(
    ("mode", "scorer", "prefetch_after_layer"),
    [
        ("frame", None, 1),
        ("frame", "spread", None),
        ("cluster", "mean_key", 1),
        ("cluster", "random", 0),
        ("cluster", "spread_share_per_token", 1),
    ],
)
def test_budget_covering_the_stream_matches_full(tiny_model, bikes_frames, mode, scorer, prefetch_after_layer):
    full = make_engine(tiny_model, mode="full")
    other = make_engine(
        tiny_model,
        mode=mode,
        scorer=scorer,
        retrieval_budget_tokens=2_000,
        device_budget_bytes=64 * MIB,
        prefetch_after_layer=prefetch_after_layer,
    )
    for engine in (full, other):
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:24])
    expected = full.answer("cam", QUESTION, max_new_tokens=1).last_hidden
    got = other.answer("cam", QUESTION, max_new_tokens=1).last_hidden
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


def test_frame_mode_keeps_one_frame_units_on_cluster_machinery(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="frame", device_budget_bytes=int(0.8 * MIB))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    units = engine.clusters("cam")
    assert all(u.first_frame == u.last_frame for u in units), "frame mode must never group frames"
    assert {u.tier for u in units} >= {"device", "host"}, "frame blocks are admitted to the device and spill"
    first = engine.answer("cam", QUESTION, max_new_tokens=1, time_range=(0.0, 2.0))
    assert first.retrieval.num_layers_scored == 2  # layer 1's choice is shared, as in cluster mode
    assert first.retrieval.bytes_fetched > 0
    second = engine.answer("cam", QUESTION, max_new_tokens=1, time_range=(0.0, 2.0))
    assert second.retrieval.device_lookups > 0
    assert second.retrieval.bytes_fetched < first.retrieval.bytes_fetched, "promotion must cache frame blocks"


@pytest.mark.parametrize("mode", ["token", "frame"])
def test_copies_count_the_host_slabs_moved_in_every_mode(tiny_model, bikes_frames, mode):
    engine = make_engine(tiny_model, mode=mode, device_budget_bytes=int(0.8 * MIB))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    stats = engine.answer("cam", QUESTION, max_new_tokens=1, time_range=(0.0, 3.0)).retrieval
    spec = tiny_model.kv_spec
    tokens_per_frame = engine.stream_stats("cam").tokens_per_frame
    slab_bytes = 2 * spec.num_kv_heads * tokens_per_frame * spec.head_dim * spec.dtype.itemsize
    assert stats.num_copies > 0
    assert stats.bytes_fetched == stats.num_copies * slab_bytes  # one count per one-frame layer slab moved
    assert 0 <= stats.device_hits <= stats.device_lookups and stats.device_lookups > 0  # measured, not assumed


def test_unknown_scorer_names_the_valid_ones():
    with pytest.raises(UnknownPolicyError, match=r"spread, spread_per_token, spread_share, .* random, recent"):
        EngineConfig(scorer="oracle")


def test_spread_per_token_is_spread_less_the_log_count_and_prefers_the_denser_unit():
    """Two units with the same keys' spread: four frames at mean key m, one frame at a slightly better mean key.
    ``spread`` estimates total mass, so the four-frame unit leads; per token, the one-frame unit does."""
    torch.manual_seed(0)
    query = torch.randn(4, 3, 8)  # [Hq, T, D]
    mean = torch.randn(1, 2, 8).expand(2, 2, 8).clone()  # [C, Hkv, D]
    mean[1] += 0.05 * query.reshape(2, 6, 8).mean(1)  # unit 1 leans toward the queries
    var = torch.full((2, 2, 8), 0.1)
    log_count = torch.log(torch.tensor([4.0 * 16, 1.0 * 16]))
    total = scorer_by_name("spread").scores(query, mean, var, log_count, scale=0.35)
    per_token = scorer_by_name("spread_per_token").scores(query, mean, var, log_count, scale=0.35)
    assert torch.allclose(per_token, total - log_count, atol=1e-6)
    assert total[0] > total[1] and per_token[1] > per_token[0]


def test_spread_share_is_each_rows_estimated_share_summed_over_the_rows():
    """Against a loop over the rows in float64: each row's Gaussian estimates, normalised over the units and the
    row's exact logits on the past keys, summed over the rows; the per-token score is that less ``log n``."""
    torch.manual_seed(1)
    query, mean, var = torch.randn(4, 3, 8), torch.randn(5, 2, 8), torch.rand(5, 2, 8)
    log_count = torch.log(torch.tensor([3.0, 1.0, 4.0, 2.0, 6.0]))
    past = torch.randn(2, 7, 8)  # [Hkv, S, D]
    scale = 0.35
    expected = torch.zeros(5, dtype=torch.float64)
    for head in range(4):
        kv = head // 2
        for token in range(3):
            q = query[head, token].double()
            est = (
                log_count.double() + scale * (mean[:, kv].double() @ q) + 0.5 * scale**2 * (var[:, kv].double() @ q**2)
            )
            total = est.exp().sum() + (scale * (past[kv].double() @ q)).exp().sum()
            expected += est.exp() / total
    past_lse = torch.logsumexp(scale * torch.einsum("hsd,htd->hts", past.repeat_interleave(2, 0), query), dim=2)
    share = scorer_by_name("spread_share").scores(query, mean, var, log_count, scale=scale, past_lse=past_lse)
    per_token = scorer_by_name("spread_share_per_token").scores(
        query, mean, var, log_count, scale=scale, past_lse=past_lse
    )
    assert torch.allclose(share.double(), expected.log(), atol=1e-5)
    assert torch.allclose(per_token, share - log_count, atol=1e-6)
    without_past = scorer_by_name("spread_share").scores(query, mean, var, log_count, scale=scale)
    assert (without_past > share).all(), "without the past, every row gives all of its share to the units"


@pytest.mark.parametrize("seed", [1, 2])
def test_spread_share_follows_the_rows_that_attend_to_the_history(seed):
    """Head 0's logits on the units are four times head 1's, but head 0 gives most of its attention to a sink key in
    the past (``bench.synthetic_recall``). ``spread`` follows head 0's largest logits; recall counts each row's
    attention, most of which head 1's rows give to the history, so the share scorers recall more, and per token
    as much as the best choice of units by their true mass per token."""
    recall = case(seed, loud_sink_head=True, scorers=("spread", "spread_share", "spread_share_per_token"))
    assert recall["spread"] < recall["ceiling"] - 0.1, "the case must trip the max over rows"
    assert recall["spread_share"] >= recall["spread"] + 0.1, recall
    assert recall["spread_share_per_token"] >= recall["ceiling"] - 0.02, recall


def _past_lse(engine, stream_id: str, layer: int, query: torch.Tensor) -> torch.Tensor:
    """Each row of ``query``: log-sum-exp of its scaled logits over the stream's sink and window keys of ``layer``,
    from a copy of those keys (``StreamState.past_layer``)."""
    keys = engine.parts.stream(stream_id).past_layer(layer)[0].float()  # [Hkv, S, D]
    group = query.shape[0] // keys.shape[0]
    logits = engine.spec.scale * torch.einsum("hsd,htd->hts", keys.repeat_interleave(group, 0), query.float())
    return torch.logsumexp(logits, dim=2)


def test_an_engine_ranking_by_share_chooses_what_the_sweep_scores_for_it(tiny_model, bikes_frames, monkeypatch):
    """The engine's choice and the probe's sweep both give the share scorer each row's normaliser over the stream's
    whole sink and window, and on the same queries the two choose alike, so their recall is the same, where
    another scorer's differs."""
    engine = make_engine(tiny_model, mode="cluster", scorer="spread_share", retrieval_budget_tokens=120)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    given = []
    score = ShareScorer.scores

    def noting_the_past(self, query, *args, past_lse=None, **kwargs):
        given.append((query, past_lse))
        return score(self, query, *args, past_lse=past_lse, **kwargs)

    monkeypatch.setattr(ShareScorer, "scores", noting_the_past)
    with probing(ProbeRequest(sweep_scorers=("spread_share", "random"))) as request:
        engine.answer("cam", QUESTION, max_new_tokens=1)
    assert len(given) == 4  # layers 0 and 1 choose, for the engine and for the sweep
    for query, past_lse in given:
        assert past_lse is not None
        expected = [_past_lse(engine, "cam", layer, query) for layer in (0, 1)]
        assert any(torch.allclose(past_lse, e, atol=1e-4) for e in expected)
    assert request.recall["spread_share"] == pytest.approx(request.recall[ENGINE], abs=1e-9)
    assert request.recall["random"] != pytest.approx(request.recall[ENGINE], abs=1e-6)


def test_the_share_scorers_past_is_the_streams_sink_and_window(tiny_model, bikes_frames):
    """The retriever's normaliser reads the stream's sink and window in the pool: all of its keys, and no other."""
    engine = make_engine(tiny_model, mode="cluster")
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:12])
    retriever = Retriever(
        machinery=machinery_for(engine.config), spec=engine.spec, tiering=engine.tiering,
        stream=engine.parts.stream("cam"), candidates=[], budget_tokens=100,
    )  # fmt: skip
    query = torch.randn(tiny_model.kv_spec.num_q_heads, 5, tiny_model.kv_spec.head_dim, device=tiny_model.device)
    for layer in range(tiny_model.kv_spec.num_layers):
        expected = _past_lse(engine, "cam", layer, query)
        torch.testing.assert_close(retriever.past_logsumexp(layer, query), expected, atol=1e-5, rtol=1e-5)


def test_the_unit_ceiling_takes_mass_per_token_not_mass():
    """Budget 4: one unit of 4 tokens with mass 6, or two of 2 tokens with mass 4 each. Ranked by mass the big unit
    fills the budget (6); by mass per token the two small ones do (8)."""
    assert densest_first(["big", "a", "b"], [6.0, 4.0, 4.0], [4, 2, 2], budget=4) == {"a", "b"}
    assert densest_first(["big", "a", "b"], [9.0, 4.0, 4.0], [4, 2, 2], budget=4) == {"big"}


def test_real_questions_report_the_unit_ceiling_and_planted_probes_do_not(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster", retrieval_budget_tokens=300)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    with probing(ProbeRequest(sweep_scorers=("random",))) as real:
        engine.answer("cam", QUESTION, max_new_tokens=1)
    planted = _probe(engine, SPANS[0])
    assert UNIT_CEILING not in planted.recall
    assert 0.0 < real.recall["random"] < real.recall[UNIT_CEILING] <= 1.0
    assert real.recall[ENGINE] <= real.recall[UNIT_CEILING] + 1e-6


def _probe(engine, span, sweep=("random", "recent")):
    with probing(ProbeRequest(span=span, sweep_scorers=sweep)) as request:
        engine.answer("cam", QUESTION, max_new_tokens=1)
    return request


@pytest.mark.parametrize("mode", ["frame", "cluster"])
def test_planted_spans_are_found_far_above_chance(tiny_model, bikes_frames, mode):
    engine = make_engine(tiny_model, mode=mode)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    requests = [_probe(engine, span) for span in SPANS]
    assert min(r.span_mass for r in requests) > 0.3, "the planted queries must really attend to the span"
    found = {name: sum(r.span_found[name] for r in requests) / len(requests) for name in (ENGINE, "random", "recent")}
    assert found[ENGINE] >= 0.8
    assert found[ENGINE] >= found["random"] + 0.3
    assert found["recent"] < 0.5, "old spans are outside what a recency window keeps"


def test_a_random_engine_finds_planted_spans_only_by_chance(tiny_model, bikes_frames):
    """The probe can fail: the same measurement on an engine that retrieves at random scores low."""
    engine = make_engine(tiny_model, mode="cluster", scorer="random")
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    requests = [_probe(engine, span, sweep=("spread",)) for span in SPANS]
    engine_found = sum(r.span_found[ENGINE] for r in requests) / len(requests)
    spread_found = sum(r.span_found["spread"] for r in requests) / len(requests)
    assert engine_found < 0.6
    assert spread_found >= engine_found + 0.3


def test_planted_queries_are_measurement_only(tiny_model, bikes_frames):
    """Outside ``probing`` a question uses its own queries: same answer state as before any probe."""
    engine = make_engine(tiny_model, mode="cluster", retrieval_budget_tokens=2_000, device_budget_bytes=64 * MIB)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    before = engine.answer("cam", QUESTION, max_new_tokens=1).last_hidden
    planted = _probe(engine, (2, 3))
    after = engine.answer("cam", QUESTION, max_new_tokens=1).last_hidden
    assert planted.span_found[ENGINE] == 1.0  # the budget covers the stream
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefetch_after_layer", [0, 1])
def test_a_question_reads_the_summaries_of_the_layers_that_choose_and_chooses_as_with_all(
    tiny_model, bikes_frames, prefetch_after_layer, monkeypatch
):
    """With an anchor only the layers up to it choose, so a question reads only their summaries; its choice and
    answer are those of a question that reads every layer's (budget under the stream, so there is a choice)."""
    summaries_class = type(make_engine(tiny_model).tiering.summaries)
    real = summaries_class.counts_and_all_layers
    read_layers, every_layer = [], [False]

    def recorded(index, cluster_ids, num_layers=None):
        read_layers.append(num_layers)
        return real(index, cluster_ids, None if every_layer[0] else num_layers)

    monkeypatch.setattr(summaries_class, "counts_and_all_layers", recorded)
    answers = []
    for reads_every_layer in (False, True):
        every_layer[0] = reads_every_layer
        engine = make_engine(
            tiny_model, mode="cluster", retrieval_budget_tokens=400, prefetch_after_layer=prefetch_after_layer
        )
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:24])
        answers.append(engine.answer("cam", QUESTION, max_new_tokens=4))
    assert read_layers == [prefetch_after_layer + 1] * 2
    narrowed, full = answers
    assert [s.cluster_id for s in narrowed.evidence] == [s.cluster_id for s in full.evidence] != []
    assert narrowed.token_ids == full.token_ids
    assert torch.equal(narrowed.last_hidden, full.last_hidden)


@pytest.mark.parametrize(("mode", "prefetch_after_layer"), [("cluster", 0), ("cluster", None), ("token", 0)])
def test_staged_bytes_are_told_apart_by_the_part_of_the_prefill_that_moved_them(
    tiny_model, bikes_frames, mode, prefetch_after_layer
):
    """With an anchor, the layers up to it stage their own choices and the later layers are staged at once from its
    choice; without one (or in ReKV's stand-in, which has none) every layer stages its own. The parts' bytes add up
    to the bytes fetched."""
    engine = make_engine(
        tiny_model, mode=mode, device_budget_bytes=int(0.8 * MIB), prefetch_after_layer=prefetch_after_layer
    )
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    stats = engine.answer("cam", QUESTION, max_new_tokens=1, time_range=(0.0, 3.0)).retrieval
    parts = {name: figures[0] for name, figures in stats.transfer_parts.items()}
    assert stats.bytes_fetched > 0
    assert sum(parts.values()) == stats.bytes_fetched
    anchored = mode == "cluster" and prefetch_after_layer is not None
    assert set(parts) == ({"choosing", "shared"} if anchored else {"choosing"})
    if anchored:  # layer 0 chooses; every later layer moves the same pages, a run a page and group of layers
        assert parts["shared"] == (tiny_model.kv_spec.num_layers - 1) * parts["choosing"]
        copies = {name: figures[3] for name, figures in stats.transfer_parts.items()}
        later = layer_groups(range(1, tiny_model.kv_spec.num_layers), engine.config.staging_groups)
        assert copies["shared"] == len(later) * copies["choosing"] > 0
