"""``Engine.warm_up`` runs a question of every prefill-graph length on a scratch stream and leaves nothing behind.

On the CPU the prefill's fixed-buffer layers run eagerly (``capture=False``), so ``num_prefills`` counts the
questions that took the path a CUDA graph replays; on a GPU that path captures the graphs.
"""

from __future__ import annotations

import pytest

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.decode_graphs import WIDTH_STEP, DecodeGraphs
from mosaic_core.engine.prefill_graphs import PrefillGraphs
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.engine.warm_up import WARM_UP_HISTORY_FRAMES, WARM_UP_INGEST_TOKENS, WARM_UP_STREAM
from mosaic_core.errors import AlreadyExistsError
from mosaic_core.model.text_fusion import MIN_FUSED_TOKENS
from tests.engine.engine_helpers import feed, make_engine


def test_warm_up_asks_every_question_length_and_leaves_nothing(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path / "data"))
    graphs = PrefillGraphs(tiny_model, engine.tiering.tiers.pools, enabled=True, capture=False)
    engine.parts.prefill_graphs = graphs
    pools = engine.tiering.tiers.pools
    free_before = pools.device_pages.num_free
    used_before = engine.tiering.residency.used_bytes(Tier.DEVICE)
    assert engine.warm_up(max_new_tokens=2, max_question_tokens=48, decode_batch=1).questions == 3
    assert graphs.num_prefills == 3  # lengths 16, 32 and 48: one prefill on the graphs' path each
    assert WARM_UP_STREAM not in engine.streams
    assert pools.device_pages.num_free == free_before
    assert engine.tiering.residency.used_bytes(Tier.DEVICE) == used_before
    assert engine.tiering.residency.reserved_bytes() == 0  # the scratch stream's sink and window reservation
    assert not (tmp_path / "data" / WARM_UP_STREAM).exists()
    engine.open_stream("cam")  # the engine serves as before
    feed(engine, "cam", bikes_frames[:8])
    assert engine.answer("cam", "What happened?", max_new_tokens=2).token_ids
    engine.close()


def test_warm_up_decodes_every_batch_size_together_so_users_answers_find_their_steps(tiny_model, bikes_frames):
    """Each count of answers up to the batch limit decodes together once during the warm-up, so on a GPU its step
    graph is captured then; users' answers that later run three at once find that step ready."""
    engine = make_engine(tiny_model)
    pools = engine.tiering.tiers.pools
    graphs = DecodeGraphs(tiny_model, pools, engine.spec.num_layers, enabled=True, capture=False)
    engine.parts.decode_graphs = graphs
    free_before = pools.device_pages.num_free
    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=16, decode_batch=4)
    assert warm.decode_batches == (2, 3, 4)
    assert sorted(batch for _, batch, _ in graphs._graphs) == [1, 2, 3, 4]
    assert graphs.num_rows == 1 + 2 + 3 + 4  # one step of each batch: no answer stepped alone in between
    assert pools.device_pages.num_free == free_before and WARM_UP_STREAM not in engine.streams
    warmed = set(graphs._graphs)
    for camera in ("a", "b", "c"):
        engine.open_stream(camera)
        feed(engine, camera, bikes_frames[:6])
    answers = [engine.ask(camera, "What happened?", max_new_tokens=3) for camera in ("a", "b", "c")]
    for answer in answers:
        next(answer)
    for answer in answers:
        assert list(answer)[-1].token_ids
    assert set(graphs._graphs) == warmed  # three at once: the warmed step, no new one
    engine.close()


def test_warm_up_decodes_alone_where_steps_do_not_run_from_fixed_buffers(tiny_model):
    engine = make_engine(tiny_model)  # on the CPU the engine's own decode graphs are off; on a GPU, turned off here
    pools = engine.tiering.tiers.pools
    engine.parts.decode_graphs = DecodeGraphs(tiny_model, pools, engine.spec.num_layers, enabled=False)
    assert engine.warm_up(max_new_tokens=1, max_question_tokens=16).decode_batches == ()
    engine.close()


def test_a_budget_with_no_room_for_many_answers_at_once_warms_up_the_counts_it_holds(tiny_model):
    """A device budget too tight for sixteen answers at once (so it was on the H100, where the engine's own decode
    graphs are on) warms up the batch sizes it holds, rather than fail the worker's start."""
    engine = make_engine(tiny_model, device_budget_bytes=MIB // 2)
    pools = engine.tiering.tiers.pools
    engine.parts.decode_graphs = DecodeGraphs(tiny_model, pools, engine.spec.num_layers, enabled=True, capture=False)
    free_before = pools.device_pages.num_free

    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=16, decode_batch=16, ingest=False)

    assert warm.questions == 1
    assert 0 < len(warm.decode_batches) < 15
    assert warm.decode_batches == tuple(range(2, 2 + len(warm.decode_batches)))
    assert pools.device_pages.num_free == free_before and WARM_UP_STREAM not in engine.streams
    assert engine.tiering.residency.reserved_bytes() == 0
    engine.close()


def test_warm_up_refuses_to_take_over_an_open_stream_of_its_scratch_name(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream(WARM_UP_STREAM)
    feed(engine, WARM_UP_STREAM, bikes_frames[:4])
    with pytest.raises(AlreadyExistsError, match="warm the engine up before"):
        engine.warm_up(max_new_tokens=1, max_question_tokens=16)
    assert engine.stream_stats(WARM_UP_STREAM).frames_ingested == 4  # the user's stream is untouched


def _big_frames_engine(model, **overrides):
    """Frames of 512 tokens, a window of two and a budget of four: a question's table passes one ``WIDTH_STEP``."""
    return make_engine(
        model,
        target_tokens_per_frame=512,
        page_tokens=None,
        local_window_tokens=1024,
        formation=FormationConfig(max_tokens=2048),
        retrieval_budget_tokens=2048,
        device_budget_bytes=256 * MIB,
        **overrides,
    )


def test_warm_up_ingests_one_big_pass_of_scratch_streams_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    engine = _big_frames_engine(tiny_model, data_dir=str(tmp_path / "data"))
    pools = engine.tiering.tiers.pools
    free_before = pools.device_pages.num_free
    passes = []
    forward = tiny_model.forward

    def recording_forward(**kwargs):  # the real forward, with each pass's token count noted
        passes.append(kwargs["input_ids"].numel())
        return forward(**kwargs)

    monkeypatch.setattr(tiny_model, "forward", recording_forward)
    assert engine.warm_up(max_new_tokens=1, max_question_tokens=16, ingest=True).ingested
    assert max(passes) >= MIN_FUSED_TOKENS  # one pass that big: what compiles the big-pass functions on CUDA
    assert engine.streams == {}
    assert pools.device_pages.num_free == free_before
    assert engine.tiering.residency.reserved_bytes() == 0
    assert engine.tiering.residency.used_bytes(Tier.DEVICE) == 0
    assert not any((tmp_path / "data").rglob(f"{WARM_UP_STREAM}*"))
    engine.close()


def test_warm_up_skips_the_ingest_when_the_budget_cannot_hold_the_scratch_windows(tiny_model, monkeypatch):
    engine = make_engine(tiny_model)  # 128 scratch streams of 16-token frames: more windows than the budget holds
    passes = []
    forward = tiny_model.forward
    monkeypatch.setattr(
        tiny_model, "forward", lambda **kwargs: passes.append(kwargs["input_ids"].numel()) or forward(**kwargs)
    )
    warm = engine.warm_up(max_new_tokens=1, max_question_tokens=16, ingest=True)
    assert (warm.questions, warm.ingested) == (1, False)  # the questions still ran
    assert max(passes) < MIN_FUSED_TOKENS
    assert engine.streams == {}
    assert engine.tiering.residency.reserved_bytes() == 0


def test_questions_over_a_full_window_and_budget_replay_what_the_warm_up_made(tiny_model, bikes_frames):
    """A graph reads tables as wide as the widest question of its stream can build, whatever this question
    retrieved: so the warm-up's questions, on a scratch stream with no window and no history, make the graphs that
    questions over a full window and a full retrieval budget replay (here their tables pass one ``WIDTH_STEP``)."""
    engine = _big_frames_engine(tiny_model)
    pools = engine.tiering.tiers.pools
    decode = DecodeGraphs(tiny_model, pools, engine.spec.num_layers, enabled=True, capture=False)
    prefill = PrefillGraphs(tiny_model, pools, enabled=True, capture=False)
    engine.parts.decode_graphs, engine.parts.prefill_graphs = decode, prefill
    engine.warm_up(max_new_tokens=2, max_question_tokens=16, decode_batch=2)
    warmed = {"decode": set(decode._graphs), "prefill": set(prefill._graphs), "anchor": set(prefill._anchors)}
    prefills_before = (prefill.num_prefills, prefill.num_anchor_prefills)
    for camera in ("a", "b"):
        engine.open_stream(camera)
        feed(engine, camera, bikes_frames[:8])
    answers = [engine.ask(camera, "What happened?", max_new_tokens=3) for camera in ("a", "b")]
    for answer in answers:
        next(answer)
    ends = [list(answer)[-1] for answer in answers]
    for end in ends:  # each question's table is past one step
        stats = engine.stream_stats(end.stream_id)
        assert stats.sink_tokens + stats.local_window_tokens + end.retrieval.num_tokens_retrieved > WIDTH_STEP
    assert {"decode": set(decode._graphs), "prefill": set(prefill._graphs), "anchor": set(prefill._anchors)} == warmed
    assert (prefill.num_prefills, prefill.num_anchor_prefills) == tuple(n + 2 for n in prefills_before)  # on graphs
    engine.close()


def test_warm_up_questions_retrieve_history_when_it_ingests(tiny_model, monkeypatch):
    """With ``ingest``, blank frames go into the question's scratch stream until a cluster has left its window, so
    the warm-up's questions score and read history (on a GPU: the kernels that compiles) as users' questions do.
    The engine's hit ratio still counts only users' questions."""
    engine = make_engine(tiny_model, device_budget_bytes=64 * MIB)
    candidates_seen = []
    select = Retriever.select

    def recording_select(self, layer, query):
        candidates_seen.append(len(self.candidates))
        return select(self, layer, query)

    monkeypatch.setattr(Retriever, "select", recording_select)
    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=16, ingest=True)
    assert warm.with_history
    assert candidates_seen and min(candidates_seen) >= 1
    assert (engine.tiering.device_lookups, engine.tiering.device_hits) == (0, 0)
    assert engine.streams == {} and engine.tiering.residency.reserved_bytes() == 0
    assert engine.tiering.residency.used_bytes(Tier.DEVICE) == 0
    engine.close()


def test_a_budget_with_no_room_for_a_question_beside_the_history_warms_up_without_it(tiny_model):
    """At a device budget this tight, a question on the scratch stream whose history it ingested finds no room:
    the warm-up asks its questions again on a stream without history, rather than fail the worker's start."""
    engine = make_engine(tiny_model, device_budget_bytes=MIB // 2)
    steps: list[str] = []
    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=48, ingest=True, on_step=steps.append)
    assert (warm.questions, warm.with_history) == (3, False)
    again = steps.index("the questions again, with no history (no device room for it beside them)")
    retried = steps[again + 1 :]
    questions = [step for step in retried if step.startswith("question ")]  # on CUDA, decode batches follow
    assert questions == [f"question {number} of 3 (prefill graphs), again with no history" for number in (1, 2, 3)]
    # told apart from the first try's: a step told twice does not move the start's state
    assert all(step.endswith(", again with no history") for step in retried)
    assert engine.streams == {} and engine.tiering.residency.reserved_bytes() == 0
    assert engine.tiering.residency.used_bytes(Tier.DEVICE) == 0
    engine.close()


def test_warm_up_tells_each_step_as_it_begins_in_order(tiny_model):
    """A worker's start says it moves with each step: the ingest pass, the history's blank frames, each question of a
    prefill-graph length, then each count of answers decoded together."""
    engine = make_engine(tiny_model, device_budget_bytes=64 * MIB)
    pools = engine.tiering.tiers.pools
    engine.parts.decode_graphs = DecodeGraphs(tiny_model, pools, engine.spec.num_layers, enabled=True, capture=False)
    steps: list[str] = []
    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=32, decode_batch=3, ingest=True, on_step=steps.append)
    assert warm.with_history and warm.questions == 2 and warm.decode_batches == (2, 3)
    history = [step for step in steps if step.startswith("a history to ask over, blank frame ")]
    assert history == [
        f"a history to ask over, blank frame {number} (of at most {WARM_UP_HISTORY_FRAMES})"
        for number in range(1, len(history) + 1)
    ]
    assert steps == [
        f"an ingest pass of {-(-WARM_UP_INGEST_TOKENS // engine.config.target_tokens_per_frame)} blank frames",
        *history,
        "question 1 of 2 (prefill graphs)",
        "question 2 of 2 (prefill graphs)",
        "2 answers decoded together (decode graphs, 2 to 3)",
        "3 answers decoded together (decode graphs, 2 to 3)",
    ]
    assert history and len(set(steps)) == len(steps)  # each step a new state: the router's silence timer restarts
    engine.close()


def test_the_question_count_it_tells_leaves_out_a_length_no_question_lands_on(tiny_model, monkeypatch):
    """A real chat template makes the shortest question longer than the first prefill length: that length has no
    question, and the steps count only the questions asked, so the last one told is 'question N of N'."""
    engine = make_engine(tiny_model)
    of_length = engine._question_of_length
    monkeypatch.setattr(engine, "_question_of_length", lambda padded: None if padded == 16 else of_length(padded))
    steps: list[str] = []
    warm = engine.warm_up(max_new_tokens=2, max_question_tokens=48, decode_batch=1, ingest=False, on_step=steps.append)
    assert warm.questions == 2
    assert steps == ["question 1 of 2 (prefill graphs)", "question 2 of 2 (prefill graphs)"]
    engine.close()
