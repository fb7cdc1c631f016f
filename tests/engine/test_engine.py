"""Engine behaviour on the tiny preset with real sample-clip frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.maintenance import apply_merges, mergeable_clusters
from mosaic_core.engine.results import Answer, FrameInput, TokenEvent
from tests.engine.engine_helpers import SMALL, feed, make_engine

QUESTION = "When did the cyclist pass the camera?"


def _hidden(engine, stream_id="cam", **kwargs):
    return engine.answer(stream_id, QUESTION, max_new_tokens=1, **kwargs).last_hidden


@pytest.mark.parametrize(("mode", "prefetch_after_layer"), [("token", None), ("cluster", None), ("cluster", 0)])
def test_budget_covering_the_stream_matches_full(tiny_model, bikes_frames, mode, prefetch_after_layer):
    full = make_engine(tiny_model, mode="full")
    other = make_engine(
        tiny_model,
        mode=mode,
        retrieval_budget_tokens=2_000,
        device_budget_bytes=64 * MIB,
        prefetch_after_layer=prefetch_after_layer,
    )
    for engine in (full, other):
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:24])
    expected, got = _hidden(full), _hidden(other)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
    logits_full = tiny_model.logits(expected[None].to(tiny_model.device, tiny_model.dtype))
    logits_other = tiny_model.logits(got[None].to(tiny_model.device, tiny_model.dtype))
    assert torch.allclose(logits_full, logits_other, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("prefetch_after_layer", "scored"), [(None, 4), (0, 1), (1, 2), (3, 4), (9, 4)])
def test_layers_after_the_prefetch_layer_reuse_its_choice(tiny_model, bikes_frames, prefetch_after_layer, scored):
    engine = make_engine(tiny_model, mode="cluster", prefetch_after_layer=prefetch_after_layer)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:40])
    answer = engine.answer("cam", QUESTION, max_new_tokens=3, measure_recall=True)
    assert tiny_model.kv_spec.num_layers == 4
    assert answer.retrieval.num_layers_scored == scored
    assert 0 < answer.retrieval.num_tokens_retrieved <= SMALL.retrieval_budget_tokens
    assert answer.evidence, "layers that scored must still rank evidence"
    assert 0.0 < answer.retrieval.attention_recall <= 1.0
    assert 0.0 < answer.retrieval.decode_attention_recall <= 1.0


def test_token_mode_never_shares_one_layer_choice(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="token", prefetch_after_layer=0)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    assert engine.answer("cam", QUESTION, max_new_tokens=1).retrieval.num_layers_scored == 4


def test_rescoring_every_decode_step_keeps_decode_recall_whole_when_the_budget_covers_all(tiny_model, bikes_frames):
    engine = make_engine(
        tiny_model, mode="cluster", retrieval_budget_tokens=2_000, device_budget_bytes=64 * MIB, rescore_every_tokens=1
    )
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    answer = engine.answer("cam", QUESTION, max_new_tokens=3, measure_recall=True)
    assert answer.retrieval.decode_attention_recall == pytest.approx(1.0)


def test_attended_kv_per_frame_stays_bounded_as_stream_grows_tenfold(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster")
    engine.open_stream("cam")
    short = engine.ingest([FrameInput("cam", t, rgb) for t, rgb in bikes_frames[:4]])
    attended = list(short.attended_tokens_per_frame)
    for i in range(4, 40, 4):
        attended += engine.ingest(
            [FrameInput("cam", t, rgb) for t, rgb in bikes_frames[i : i + 4]]
        ).attended_tokens_per_frame
    stats = engine.stream_stats("cam")
    bound = stats.sink_tokens + SMALL.local_window_tokens + 2 * stats.tokens_per_frame
    assert stats.frames_ingested == 40
    assert max(attended) <= bound
    # the stream grew 10x but the last frames attended no more than the early ones once the window filled
    assert max(attended[-10:]) == max(attended[4:14])


def _assert_stream_stats_count_its_clusters(engine, stream_id: str) -> None:
    """The stream's stats (kept as clusters change) agree with its clusters listed one by one."""
    stats, infos = engine.stream_stats(stream_id), engine.clusters(stream_id)
    assert stats.num_clusters == len(infos)
    for tier in Tier:
        name = tier.name.lower()
        assert stats.clusters_by_tier[name] == sum(1 for info in infos if info.tier == name), name
        assert stats.bytes_by_tier[name] == sum(info.num_bytes for info in infos if info.tier == name), name


def test_device_tier_stays_within_budget_and_clusters_spill_whole(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster", device_budget_bytes=int(1.3 * MIB))
    engine.open_stream("cam")
    for i in range(0, 40, 4):
        feed(engine, "cam", bikes_frames[i : i + 4])
        residency = engine.tiering.residency
        assert residency.used_bytes(Tier.DEVICE) <= residency.capacity_bytes(Tier.DEVICE)
        residency.check_invariants()
        pools = engine.tiering.tiers.pools  # every page in use is accounted for, and the pool is the budget
        assert pools.device_pages.num_used * pools.page_bytes <= residency.used_bytes(Tier.DEVICE)
        assert engine.stats().device_pool_bytes <= engine.config.device_budget_bytes
    assert engine.stats().clusters_by_tier["host"] > 0, "a tight budget must spill clusters to the host tier"
    # the oldest clusters were spilled first (LRU), so asking about the start must fetch from the host
    answer = engine.answer("cam", QUESTION, max_new_tokens=3, time_range=(0.0, 2.0))
    assert answer.retrieval.bytes_fetched > 0
    assert engine.tiering.residency.used_bytes(Tier.DEVICE) <= engine.tiering.residency.capacity_bytes(Tier.DEVICE)
    for info in engine.clusters("cam"):  # every cluster lives whole in exactly one tier
        kv = engine.tiering.tiers.read(info.cluster_id)
        assert kv.shape[3] == info.num_tokens
        assert info.tier == engine.tiering.tiers.tier_of(info.cluster_id).name.lower()
    _assert_stream_stats_count_its_clusters(engine, "cam")


def test_token_mode_copies_block_by_block_and_cluster_mode_reuses_device_clusters(tiny_model, bikes_frames):
    results = {}
    for mode in ("token", "cluster"):
        engine = make_engine(tiny_model, mode=mode, device_budget_bytes=4 * MIB)
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:32])
        first = engine.answer("cam", QUESTION, max_new_tokens=1)
        second = engine.answer("cam", QUESTION, max_new_tokens=1)
        results[mode] = (first.retrieval, second.retrieval)
    token_first, token_second = results["token"]
    assert token_first.num_copies >= token_first.num_clusters_retrieved  # one copy per block and layer
    assert token_second.bytes_fetched == token_first.bytes_fetched  # nothing is cached between questions
    _, cluster_second = results["cluster"]
    assert cluster_second.device_hits == cluster_second.device_lookups  # the second question hits the cache
    assert cluster_second.bytes_fetched == 0


def test_answer_streams_tokens_then_evidence_inside_the_stream(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster")
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24], offset_s=1000.0)
    events = list(engine.ask("cam", QUESTION, max_new_tokens=4))
    assert all(isinstance(e, TokenEvent) for e in events[:-1]) and isinstance(events[-1], Answer)
    answer = events[-1]
    assert 1 <= len(answer.token_ids) <= 4 and len(events) == len(answer.token_ids) + 1
    assert answer.evidence, "a stream longer than the window must give evidence"
    assert [span.rank for span in answer.evidence] == list(range(1, len(answer.evidence) + 1))
    first, last = bikes_frames[0][0] + 1000.0, bikes_frames[23][0] + 1000.0
    for span in answer.evidence:
        assert first <= span.start_s <= span.end_s <= last
    scores = [span.score for span in answer.evidence]
    assert scores == sorted(scores, reverse=True)


def test_time_range_restricts_candidates(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster")
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    answer = engine.answer("cam", QUESTION, max_new_tokens=1, time_range=(0.0, 2.0))
    assert answer.evidence and all(span.start_s <= 2.0 for span in answer.evidence)


def test_streams_batched_together_match_streams_run_alone(tiny_model, bikes_frames):
    together = make_engine(tiny_model, mode="cluster")
    alone = make_engine(tiny_model, mode="cluster")
    for stream_id in ("a", "b"):
        together.open_stream(stream_id)
    alone.open_stream("a")
    reversed_frames = [(t, np.ascontiguousarray(rgb[::-1])) for t, rgb in bikes_frames[:16]]
    for i in range(0, 16, 4):
        batch = [FrameInput("a", t, rgb) for t, rgb in bikes_frames[i : i + 4]]
        batch += [FrameInput("b", t, rgb) for t, rgb in reversed_frames[i : i + 4]]
        result = together.ingest(batch)
        assert result.num_forward_passes == 4  # both cameras share each pass
        feed(alone, "a", bikes_frames[i : i + 4])
    assert torch.allclose(_hidden(together, "a"), _hidden(alone, "a"), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_hidden(together, "a"), _hidden(together, "b"), atol=1e-3)
    assert {c.stream_id for c in together.clusters("b")} == {"b"}


def test_streams_of_different_frame_sizes_share_a_pass_and_match_streams_run_alone(tiny_model, bikes_frames):
    """A square camera's frames have 16 tokens, the bikes clip's 18: the square row is left-padded by 2 and
    shares each pass, and both streams end where they would alone."""
    rng = np.random.default_rng(7)
    square = [(t, rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for t, _ in bikes_frames[:12]]
    together = make_engine(tiny_model, mode="cluster")
    for stream_id in ("a", "b"):
        together.open_stream(stream_id)
    alone = {stream_id: make_engine(tiny_model, mode="cluster") for stream_id in ("a", "b")}
    for stream_id, engine in alone.items():
        engine.open_stream(stream_id)
    for i in range(0, 12, 4):
        batch = [FrameInput("a", t, rgb) for t, rgb in bikes_frames[i : i + 4]]
        batch += [FrameInput("b", t, rgb) for t, rgb in square[i : i + 4]]
        assert together.ingest(batch).num_forward_passes == 4
        feed(alone["a"], "a", bikes_frames[i : i + 4])
        feed(alone["b"], "b", square[i : i + 4])
    tokens = {sid: together.stream(sid).geometry.tokens_per_frame for sid in ("a", "b")}
    assert tokens == {"a": 18, "b": 16}
    for stream_id in ("a", "b"):
        assert torch.allclose(_hidden(together, stream_id), _hidden(alone[stream_id], stream_id), rtol=1e-4, atol=1e-4)
        assert [c.num_tokens for c in together.clusters(stream_id)] == [
            c.num_tokens for c in alone[stream_id].clusters(stream_id)
        ]


def test_co_retrieved_neighbours_merge_into_one_cluster(tiny_model, bikes_frames):
    # min_similarity=1 makes every frame its own cluster, so two neighbours fit under the size cap together
    one_frame_clusters = FormationConfig(max_tokens=48, min_similarity=1.0)
    engine = make_engine(tiny_model, mode="cluster", merge_min_questions=3, formation=one_frame_clusters)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    state = engine.stream("cam")
    ordered = mergeable_clusters(engine.parts, state)
    assert len(ordered) >= 3
    left, right = ordered[0], ordered[1]
    expected_kv = torch.cat([engine.tiering.tiers.read(left), engine.tiering.tiers.read(right)], dim=3)
    tiers = engine.tiering.tiers
    assert tiers.tier_of(left) is tiers.tier_of(right)  # so the merge can hand over their pages
    pages = [*tiers.pages(left).device, *tiers.pages(right).device]
    moved_before = dict(tiers.stats.bytes_by_direction)
    before = len(engine.clusters("cam"))
    summaries = engine.tiering.summaries
    sum_before = summaries.stats_copy(left)[0][0] + summaries.stats_copy(right)[0][0]
    merged = []
    for _ in range(3):  # questions that keep retrieving both neighbours, and nothing else
        merged += apply_merges(engine.parts, state, [left, right])
    assert len(merged) == 1
    assert tiers.pages(merged[0]).device == pages and tiers.stats.bytes_by_direction == moved_before  # no copy
    assert len(engine.clusters("cam")) == before - 1
    assert left not in engine.tiering.residency and right not in engine.tiering.residency
    assert torch.equal(engine.tiering.tiers.read(merged[0]).to(expected_kv.device), expected_kv)
    assert engine.tiering.summaries.count(merged[0]) == expected_kv.shape[3]
    assert torch.allclose(summaries.stats_copy(merged[0])[0][0], sum_before)
    assert len(summaries) == len(engine.tiering.residency), "the merged-away clusters' rows ended with them"
    record = state.former.get(merged[0])
    assert record.start_s == bikes_frames[0][0]
    engine.answer("cam", QUESTION, max_new_tokens=1)  # the stream still answers


def test_unrelated_clusters_do_not_merge(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster", merge_min_questions=3)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    state = engine.stream("cam")
    ordered = mergeable_clusters(engine.parts, state)
    for i in range(4):  # each question retrieves a different single cluster
        assert apply_merges(engine.parts, state, [ordered[i % len(ordered)]]) == []


def test_close_stream_frees_every_tier(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster", device_budget_bytes=int(1.3 * MIB))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    engine.close_stream("cam")
    for tier in Tier:
        assert engine.tiering.residency.used_bytes(tier) == 0
    engine.open_stream("cam")  # the id can be reused


def test_retention_drops_old_sealed_clusters_from_every_tier(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster", device_budget_bytes=int(1.3 * MIB))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:32])
    before = engine.clusters("cam")
    cutoff = bikes_frames[16][0]
    dropped = engine.drop_clusters_before("cam", cutoff)
    assert dropped and all(c.end_s < cutoff for c in before if c.cluster_id in dropped)
    after = engine.clusters("cam")
    assert {c.cluster_id for c in after} == {c.cluster_id for c in before} - set(dropped)
    assert all(c.end_s >= cutoff for c in after)
    engine.tiering.residency.check_invariants()
    _assert_stream_stats_count_its_clusters(engine, "cam")
    engine.answer("cam", QUESTION, max_new_tokens=1)  # retention leaves a working stream


def test_a_deleted_engine_is_freed_at_once_not_by_the_garbage_collector(tiny_model, bikes_frames):
    """Nothing the engine owns points back at it: a benchmark that builds engine after engine must not keep the
    old ones' device page pools until a collection happens to run."""
    import gc
    import weakref

    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:12])
    engine.answer("cam", "what moved?", max_new_tokens=2)
    pool = weakref.ref(engine.tiering.tiers.pools.device_pool)
    gc.disable()
    try:
        del engine
        assert pool() is None
    finally:
        gc.enable()


def test_an_ingest_call_says_where_its_host_time_went(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    result = engine.ingest([FrameInput("cam", t, rgb) for t, rgb in bikes_frames[:4]])
    parts = (result.issue_s, result.wait_s, result.place_s)
    assert all(part > 0 for part in parts)
    assert sum(parts) <= result.prefill_s


def test_every_clusters_summary_holds_its_stored_keys(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster")
    for stream_id in ("a", "b", "c"):
        engine.open_stream(stream_id)
    for t in range(20):  # one call a second: one pass of three rows, frames leaving windows, each stream's own
        pictures = {"a": bikes_frames[t][1], "b": bikes_frames[t + 20][1], "c": bikes_frames[39 - t][1]}
        engine.ingest([FrameInput(stream_id, float(t), rgb) for stream_id, rgb in pictures.items()])
    summaries, tiers = engine.tiering.summaries, engine.tiering.tiers
    assert len(summaries) >= 6
    for cluster_id in engine.tiering.residency.clusters():
        keys = tiers.read(cluster_id)[:, 0].float().to(summaries.device)  # [L, H, n, D]
        stats, count = summaries.stats_copy(cluster_id)
        assert count == keys.shape[2]
        assert torch.allclose(stats[0], keys.sum(dim=2), rtol=1e-4, atol=1e-3)
        assert torch.allclose(stats[1], keys.square().sum(dim=2), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_clusters_copied_to_the_host_as_they_complete_make_a_questions_room_without_copies(
    tiny_model, bikes_frames, share
):
    engine = make_engine(
        tiny_model, mode="cluster", device_budget_bytes=int(1.3 * MIB), host_copy_below_device_free=share
    )
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:40])
    stats = engine.tiering.tiers.stats
    before = stats.bytes_by_direction["device_to_host"]
    answer = engine.answer("cam", QUESTION, max_new_tokens=3, time_range=(0.0, 2.0))
    spilled_by_the_question = stats.bytes_by_direction["device_to_host"] - before
    assert answer.retrieval.bytes_fetched > 0, "the question must fetch, and so take room on the device"
    if share:
        assert spilled_by_the_question == 0, "every cluster it spilled had its host copy already"
        assert before > 0, "the copies were made as the clusters completed, while ingesting"
    else:
        assert spilled_by_the_question > 0, "without copies ahead the question's room copies clusters to the host"
    for info in engine.clusters("cam"):
        assert engine.tiering.tiers.read(info.cluster_id).shape[3] == info.num_tokens


def test_staging_groups_of_any_size_give_the_same_answer(tiny_model, bikes_frames):
    """Staging copies grouped otherwise move the same bytes into the same pages: the answer and the prefill's last
    hidden state are those of ``prefill_graph_layers`` a group (a 1.3-MiB device tier, so the question stages from the
    host)."""
    answers = []
    for groups in ((), (1,), (2, 1)):
        engine = make_engine(
            tiny_model, mode="cluster", device_budget_bytes=int(1.3 * MIB), retrieval_budget_tokens=400,
            staging_groups=groups,
        )  # fmt: skip
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:40])
        answers.append(engine.answer("cam", QUESTION, max_new_tokens=3, time_range=(0.0, 2.0)))
    assert answers[0].retrieval.bytes_fetched > 0
    for other in answers[1:]:
        assert other.token_ids == answers[0].token_ids
        assert other.retrieval.bytes_fetched == answers[0].retrieval.bytes_fetched
        assert torch.equal(other.last_hidden, answers[0].last_hidden)
