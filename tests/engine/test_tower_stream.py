"""The vision tower on a CUDA stream of its own (``EngineConfig.tower_stream``): consecutive ingest calls store the
clusters, KV, key summaries and keyframes they store without it, and questions started at pauses inside the tower
run on the compute stream.

On the CPU there are no streams, and the engines below take one path; with ``MOSAIC_TEST_DEVICE=cuda`` each call's
tower runs on its own stream, beside the previous call's language model.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import FrameInput
from mosaic_core.errors import BudgetError
from tests.engine.engine_helpers import make_engine

STREAMS = ("cam-a", "cam-b")
CALLS = 5
FRAMES_PER_CALL = 2  # per stream


# About 10 ms of a GPU's clock cycles: on CUDA the tower stream idles this long before each call's tower, so a language
# model that did not wait for the tower's event would read its outputs before they were written.
STALL_CYCLES = 20_000_000


def _stall_tower_stream(engine) -> None:
    if engine.parts.tower_stream is not None:
        with torch.cuda.stream(engine.parts.tower_stream):
            torch.cuda._sleep(STALL_CYCLES)


def _ingest(engine, bikes_frames, pauses_for=lambda: None) -> None:
    """``CALLS`` calls one after another, with no wait between them: each call's tower may run beside the language
    model of the call before it, and on CUDA starts late (``STALL_CYCLES``)."""
    for stream_id in STREAMS:
        engine.open_stream(stream_id)
    for call in range(CALLS):
        _stall_tower_stream(engine)
        first = call * FRAMES_PER_CALL
        batch = [
            FrameInput(stream_id, t, rgb)
            for i, stream_id in enumerate(STREAMS)
            for t, rgb in bikes_frames[i + first : i + first + FRAMES_PER_CALL]
        ]
        engine.ingest(batch, pauses=pauses_for())


def _crc(kv: torch.Tensor) -> int:
    return zlib.crc32(kv.cpu().contiguous().view(torch.uint8).numpy().data)


def _stored(engine) -> dict:
    """What the engine holds per stream: its clusters' spans, tokens and KV, and its keyframes."""
    stored = {}
    for stream_id in STREAMS:
        clusters = engine.clusters(stream_id)
        stored[stream_id] = {
            "clusters": [
                (c.cluster_id, c.start_s, c.end_s, c.num_tokens, _crc(engine.tiering.tiers.read(c.cluster_id)))
                for c in clusters
            ],
            "keyframes": [
                (k.keyframe_id, k.jpeg) for c in clusters for k in engine.keyframes(stream_id, cluster_id=c.cluster_id)
            ],
            "frames": engine.stream_stats(stream_id).frames_ingested,
        }
    return stored


def test_the_tower_on_its_own_stream_stores_what_it_stores_without(tiny_model, bikes_frames):
    plain = make_engine(tiny_model, tower_stream=False)
    _ingest(plain, bikes_frames)
    overlapped = make_engine(tiny_model, tower_stream=True)
    assert (overlapped.parts.tower_stream is not None) == (tiny_model.device.type == "cuda")
    _ingest(overlapped, bikes_frames)

    expected = _stored(plain)
    assert all(len(held["clusters"]) >= 2 for held in expected.values()), "the calls must seal clusters to compare"
    assert _stored(overlapped) == expected
    ids = [c[0] for held in expected.values() for c in held["clusters"]]
    checksums = plain.tiering.summaries.checksums(ids)
    assert min(checksums) > 0
    assert overlapped.tiering.summaries.checksums(ids) == pytest.approx(checksums, rel=1e-5)


def test_questions_at_pauses_inside_the_tower_run_on_the_compute_stream(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, tower_stream=True)
    compute = torch.cuda.current_stream(tiny_model.device) if tiny_model.device.type == "cuda" else None
    served_on = []

    def serve():
        served_on.append(torch.cuda.current_stream(tiny_model.device) if compute is not None else None)

    def pauses_for():
        return IngestPauses(serve, every_layers=64, vision_blocks=1)  # before the tiny tower's second block

    _ingest(engine, bikes_frames, pauses_for)
    assert len(tiny_model.model.model.visual.blocks) == 2
    # per call: inside the tower, after it, and before each pass's first layer (two passes of one frame a stream)
    assert len(served_on) == CALLS * (2 + FRAMES_PER_CALL)
    if compute is not None:  # on the CPU there is no stream to be on
        assert served_on == [compute] * len(served_on)
    assert engine.answer("cam-a", "What moved?", max_new_tokens=2).token_ids


TWIN = {"clusters_opened": 7, "key_sum_checksums": {"c1": 100.0, "c2": 50.0}}


@pytest.mark.parametrize(
    ("other", "agrees"),
    [
        ({"clusters_opened": 7, "key_sum_checksums": {"c1": 100.0 * (1 + 1e-7), "c2": 50.0}}, True),  # float rounding
        ({"clusters_opened": 8, "key_sum_checksums": {"c1": 100.0, "c2": 50.0}}, False),
        ({"clusters_opened": 7, "key_sum_checksums": {"c1": 100.0, "c2": 50.1}}, False),
        ({"clusters_opened": 7, "key_sum_checksums": {"c1": 100.0, "c3": 50.0}}, False),
    ],
)
def test_scenario_b_calls_two_digests_alike_only_with_the_same_clusters_and_keys(other, agrees):
    from mosaic_core.bench.scenario_b import _digests_agree

    assert _digests_agree(other, TWIN) is agrees


def test_a_call_uses_the_tower_encoded_ahead_for_its_own_frames_only(tiny_model, bikes_frames):
    def batch(call):
        return [
            FrameInput(stream_id, t, rgb)
            for i, stream_id in enumerate(STREAMS)
            for t, rgb in bikes_frames[i + 2 * call : i + 2 * call + 2]
        ]

    plain = make_engine(tiny_model)
    for stream_id in STREAMS:
        plain.open_stream(stream_id)
    for call in range(CALLS):
        plain.ingest(batch(call))

    ahead = make_engine(tiny_model, tower_stream=True)
    for stream_id in STREAMS:
        ahead.open_stream(stream_id)
    _stall_tower_stream(ahead)  # on CUDA: a language model that did not wait for the tower queued ahead reads too early
    encoded = ahead.encode_ahead(batch(0))
    tower_pauses = []
    for call in range(CALLS):
        frames = batch(call)
        stale = call == 2  # the same times, other pixel arrays: not these frames, so the call runs its own tower
        if stale:
            frames = [FrameInput(f.stream_id, f.timestamp_s, f.rgb.copy()) for f in frames]
        pauses = IngestPauses(functools.partial(tower_pauses.append, call), every_layers=64, vision_blocks=1)
        result = ahead.ingest(frames, pauses=pauses, encoded=encoded)
        assert result.encoded_ahead is not stale
        if call + 1 < CALLS:
            _stall_tower_stream(ahead)
            encoded = ahead.encode_ahead(batch(call + 1))
    assert tower_pauses.count(2) == 2 + FRAMES_PER_CALL  # inside and after its own tower, and before each pass
    assert all(tower_pauses.count(call) == FRAMES_PER_CALL for call in (0, 1, 3, 4))  # the passes' pauses only
    assert _stored(ahead) == _stored(plain)


def test_a_refused_encoding_changes_no_stream_and_the_call_checks_its_frames_again(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, formation=FormationConfig(max_tokens=8))  # a frame of the clip has 18 tokens
    engine.open_stream("cam-a")
    frames = [FrameInput("cam-a", t, rgb) for t, rgb in bikes_frames[:2]]
    with pytest.raises(BudgetError, match=r"formation\.max_tokens=8"):
        engine.encode_ahead(frames)
    assert engine.stream("cam-a").geometry is None
    with pytest.raises(BudgetError, match=r"formation\.max_tokens=8"):
        engine.ingest(frames)
    assert engine.stream_stats("cam-a").frames_ingested == 0


def test_an_encoding_is_not_used_for_a_stream_opened_again_under_its_id(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, tower_stream=True)
    engine.open_stream("cam-a")
    frames = [FrameInput("cam-a", t, rgb) for t, rgb in bikes_frames[:2]]
    encoded = engine.encode_ahead(frames)
    engine.close_stream("cam-a")
    engine.open_stream("cam-a")
    result = engine.ingest(frames, encoded=encoded)
    assert not result.encoded_ahead
    assert engine.stream_stats("cam-a").frames_ingested == 2


def test_a_tower_encoded_ahead_pauses_where_the_calls_own_tower_would(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, tower_stream=True)
    for stream_id in STREAMS:
        engine.open_stream(stream_id)
    frames = [FrameInput(s, t, rgb) for i, s in enumerate(STREAMS) for t, rgb in bikes_frames[i : i + 2]]
    served = []
    ahead_pauses = IngestPauses(functools.partial(served.append, "ahead"), every_layers=64, vision_blocks=1)
    encoded = engine.encode_ahead(frames, pauses=ahead_pauses)
    assert served == ["ahead", "ahead"]  # inside the tower (before its second block) and after it
    call_pauses = IngestPauses(functools.partial(served.append, "call"), every_layers=64, vision_blocks=1)
    assert engine.ingest(frames, pauses=call_pauses, encoded=encoded).encoded_ahead
    assert served == ["ahead", "ahead"] + ["call"] * 2  # the first layer of each of the call's two passes
