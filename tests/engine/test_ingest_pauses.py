"""Pauses inside an ingest call (``IngestPauses``): they come where documented, a question started at one answers
from the streams as they were before the pass under way, and the ingest around it ends as if no question had run."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine import ingest_pauses
from mosaic_core.engine.ingest_pauses import IngestPauses, PauseMarks
from mosaic_core.engine.results import FrameInput
from tests.engine.engine_helpers import feed, with_history
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens

QUESTION = "When did the cyclist pass the camera?"
LATER_QUESTION = "Was there a dog near the road?"
STREAMS = ("cam-a", "cam-b")


def _opened(tiny_model, bikes_frames):
    return with_history(tiny_model, bikes_frames, STREAMS)


def _batch(bikes_frames) -> list[FrameInput]:
    """Four more frames of each stream: four passes, one frame per stream each (``max_frames_per_pass`` 1)."""
    return [
        FrameInput(stream_id, t, rgb) for i, stream_id in enumerate(STREAMS) for t, rgb in bikes_frames[i + 16 : i + 20]
    ]


@pytest.mark.parametrize(
    ("vision_frames", "vision_blocks", "vision_pauses"),
    [(3, None, 3), (None, None, 1), (3, 1, 6), (None, 1, 2), (None, 2, 1)],
)
def test_pauses_come_after_the_vision_tower_or_its_chunks_inside_it_and_before_every_few_layers_of_each_pass(
    tiny_model, bikes_frames, vision_frames, vision_blocks, vision_pauses
):
    assert len(tiny_model.model.model.visual.blocks) == 2  # so vision_blocks 1 pauses once inside a call, 2 never
    engine = _opened(tiny_model, bikes_frames)
    pauses = IngestPauses(lambda: None, every_layers=2, vision_frames=vision_frames, vision_blocks=vision_blocks)
    result = engine.ingest(_batch(bikes_frames), pauses=pauses)  # 8 frames: 3 chunks of at most 3, or one call
    num_layers = tiny_model.kv_spec.num_layers
    assert result.num_forward_passes == 4
    assert pauses.num_pauses == vision_pauses + 4 * -(-num_layers // 2)


@pytest.mark.parametrize("alongside", [False, True])  # the same on the CPU; two paths with MOSAIC_TEST_DEVICE=cuda
@pytest.mark.parametrize(
    ("vision_frames", "vision_blocks", "start_at", "frames_seen"),
    [
        (4, None, 3, 16),  # the first pass's first layer pause: after the tower's two chunks, before its layers
        (None, 1, 1, 16),  # inside the tower, before its second block
        (None, None, 6, 17),  # the second pass's first layer pause (tiny has 4 layers), after the first pass
    ],
)
def test_a_question_started_at_a_pause_answers_as_before_the_pass_and_leaves_the_ingest_as_it_was(
    tiny_model, bikes_frames, monkeypatch, vision_frames, vision_blocks, start_at, frames_seen, alongside
):
    hiddens = record_hiddens(tiny_model, monkeypatch)
    reference = _opened(tiny_model, bikes_frames)
    if frames_seen > 16:
        feed(reference, "cam-a", bikes_frames[16:frames_seen], batch=4)  # the passes done before the pause
    expected = reference.answer("cam-a", QUESTION, max_new_tokens=6).token_ids
    expected_hiddens = list(hiddens)
    feed(reference, "cam-a", bikes_frames[frames_seen:20], batch=4)  # what the paused call ingests, in another order
    feed(reference, "cam-b", bikes_frames[17:21], batch=4)
    hiddens.clear()
    later = reference.answer("cam-b", LATER_QUESTION, max_new_tokens=4).token_ids
    later_hiddens = list(hiddens)

    engine = _opened(tiny_model, bikes_frames)
    started = []

    def serve():
        if pauses.num_pauses == start_at:
            answer = engine.ask("cam-a", QUESTION, max_new_tokens=6)
            started.append((answer, next(answer).token_id, engine.stream_stats("cam-a").frames_ingested))

    pauses = IngestPauses(
        serve, every_layers=1, vision_frames=vision_frames, vision_blocks=vision_blocks, alongside=alongside
    )
    hiddens.clear()
    engine.ingest(_batch(bikes_frames), pauses=pauses)
    [(answer, first, frames_at_pause)] = started
    assert frames_at_pause == frames_seen  # the pass under way had not added its frame yet
    tokens = [first] + [event.token_id for event in answer if hasattr(event, "token_id")]
    assert tokens == expected
    assert_same_hiddens(hiddens, expected_hiddens)
    assert engine.stream_stats("cam-a").frames_ingested == 20
    hiddens.clear()
    assert engine.answer("cam-b", LATER_QUESTION, max_new_tokens=4).token_ids == later
    assert_same_hiddens(hiddens, later_hiddens)


@pytest.mark.parametrize(("placed_frames", "place_pauses"), [(1, 4), (2, 0), (None, 0)])
def test_pauses_while_placing_come_after_every_few_frames_but_never_after_a_pass_s_last(
    tiny_model, bikes_frames, placed_frames, place_pauses
):
    engine = _opened(tiny_model, bikes_frames)
    pauses = IngestPauses(lambda: None, every_layers=2, placed_frames=placed_frames)
    engine.ingest(_batch(bikes_frames), pauses=pauses)  # 4 passes of 2 rows, a frame each
    assert pauses.num_pauses == 1 + 4 * -(-tiny_model.kv_spec.num_layers // 2) + place_pauses


@pytest.mark.parametrize("alongside", [False, True])
def test_a_question_started_while_placing_sees_the_streams_placed_so_far(tiny_model, bikes_frames, alongside):
    reference = _opened(tiny_model, bikes_frames)
    feed(reference, "cam-a", bikes_frames[16:17])  # cam-a's frame of the first pass, placed before cam-b's
    expected = reference.answer("cam-a", QUESTION, max_new_tokens=6).token_ids
    feed(reference, "cam-a", bikes_frames[17:20], batch=3)
    feed(reference, "cam-b", bikes_frames[17:21], batch=4)
    later = reference.answer("cam-b", LATER_QUESTION, max_new_tokens=4).token_ids

    engine = _opened(tiny_model, bikes_frames)
    started = []

    def serve():
        if not started and engine.stream_stats("cam-a").frames_ingested == 17:
            answer = engine.ask("cam-a", QUESTION, max_new_tokens=6)
            started.append((answer, next(answer).token_id, engine.stream_stats("cam-b").frames_ingested))

    pauses = IngestPauses(serve, every_layers=100, placed_frames=1, alongside=alongside)
    engine.ingest(_batch(bikes_frames), pauses=pauses)
    [(answer, first, cam_b_frames)] = started
    assert cam_b_frames == 16  # its frame of that pass was not placed yet
    assert [first] + [event.token_id for event in answer if hasattr(event, "token_id")] == expected
    assert engine.answer("cam-b", LATER_QUESTION, max_new_tokens=4).token_ids == later


def test_pauses_with_no_work_are_passed_without_serving(tiny_model, bikes_frames):
    engine = _opened(tiny_model, bikes_frames)
    served_at = []
    pauses = IngestPauses(
        lambda: served_at.append(pauses.num_pauses), every_layers=2, has_work=lambda: pauses.num_pauses in (3, 7)
    )
    engine.ingest(_batch(bikes_frames), pauses=pauses)
    assert pauses.num_pauses == 1 + 4 * -(-tiny_model.kv_spec.num_layers // 2)
    assert served_at == [3, 7]


class _Mark:
    def __init__(self, name: str, waited: list[str]) -> None:
        self.name, self._waited = name, waited

    def synchronize(self) -> None:
        self._waited.append(self.name)


def _marks_for_events(monkeypatch, waited: list[str], name) -> list[_Mark]:
    """Stands marks in for the pauses' CUDA events (no device is touched); ``name(i)`` names the i-th made."""
    made: list[_Mark] = []

    def recorded():
        made.append(_Mark(name(len(made)), waited))
        return made[-1]

    monkeypatch.setattr(ingest_pauses, "_recorded", recorded)
    return made


@pytest.mark.parametrize("lookahead", [1, 3])
def test_the_host_waits_at_a_pause_for_the_mark_left_lookahead_pauses_back(lookahead):
    marks = PauseMarks(lookahead)
    waited = [marks.push(f"pause {i}") for i in range(6)]
    assert waited == [None] * lookahead + [f"pause {i}" for i in range(6 - lookahead)]


def test_the_host_waits_for_the_device_at_layer_pauses_but_never_while_placing(monkeypatch):
    waited: list[str] = []
    made = _marks_for_events(monkeypatch, waited, lambda i: f"mark {i}")
    cuda = torch.device("cuda")  # the waits are CUDA's; no device is touched, the marks stand in for its events
    pauses = IngestPauses(lambda: None, every_layers=2, placed_frames=1, lookahead=1)
    for _ in range(2):  # two passes of 4 layers and 3 rows
        pauses.begin_pass()
        for layer in range(4):
            pauses.before_layer(layer, cuda)
        for row in range(3):
            if pauses.placed(1, last_of_pass=row == 2):
                pauses.pause(cuda)
    assert pauses.num_pauses == 2 * (2 + 2)
    assert [m.name for m in made] == ["mark 0", "mark 1", "mark 2", "mark 3"]  # one a layer pause
    assert waited == ["mark 0", "mark 1", "mark 2"]  # each layer pause for the one before it; placing, for none


@pytest.mark.parametrize("tower_apart", [False, True])
def test_with_the_tower_on_its_own_stream_its_pauses_neither_mark_nor_wait(monkeypatch, tower_apart):
    waited: list[str] = []
    made = _marks_for_events(monkeypatch, waited, lambda i: f"mark {i}")
    cuda = torch.device("cuda")  # the waits are CUDA's; no device is touched, the marks stand in for its events
    pauses = IngestPauses(lambda: None, every_layers=2, vision_blocks=1, lookahead=1)
    pauses.begin_call(None, None, tower_apart=tower_apart)
    for block in range(3):
        pauses.before_vision_block(block, device=cuda)
    pauses.pause(cuda, in_tower=True)  # after the tower
    pauses.begin_pass()
    for layer in range(4):
        pauses.before_layer(layer, cuda)
    assert pauses.num_pauses == 2 + 1 + 2
    if tower_apart:  # the layer pauses only: the second waits for the first
        assert ([m.name for m in made], waited) == (["mark 0", "mark 1"], ["mark 0"])
    else:  # every pause marks, and each waits for the one before it
        assert len(made) == 5 and waited == ["mark 0", "mark 1", "mark 2", "mark 3"]


@pytest.mark.parametrize("field", ["every_layers", "vision_frames", "vision_blocks", "placed_frames", "lookahead"])
def test_pauses_need_positive_spacing(field):
    with pytest.raises(ValueError, match=field):
        IngestPauses(lambda: None, **{field: 0})


def test_what_work_at_a_pause_allocates_can_be_written_after_the_call(tiny_model, bikes_frames):
    """Work at a pause runs inside the language model's forward. What it allocates outlives the call: here a host
    chunk the pool grows by, as a question's spill at a pause would grow it. Written to after the call, it must
    take the write (on the H200, pages allocated under the forward's old ``torch.inference_mode`` failed every later
    write with "Inplace update to inference tensor outside InferenceMode")."""
    engine = _opened(tiny_model, bikes_frames)
    pools = engine.tiering.tiers.pools
    taken = []

    def serve():
        if pauses.num_pauses == 2:  # the first pause before a language-model layer
            chunks = len(pools.host_chunks)
            taken.extend(pools.take(Tier.HOST, pools.host_pages.num_free + 1))
            assert len(pools.host_chunks) > chunks

    pauses = IngestPauses(serve, every_layers=1)
    engine.ingest(_batch(bikes_frames), pauses=pauses)
    assert taken
    spec = engine.spec
    kv = torch.ones((spec.num_layers, 2, spec.num_kv_heads, pools.page_tokens, spec.head_dim), dtype=spec.dtype)
    pools.write(Tier.HOST, [taken[-1]], [pools.page_tokens], kv)
    assert torch.equal(pools.page(Tier.HOST, taken[-1]), kv)
