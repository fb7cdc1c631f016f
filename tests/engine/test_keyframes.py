"""Keyframes: which frames a forming cluster keeps, their ids, and how they live and die with their clusters."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Tier, TierBudgets
from mosaic_core.config import EngineConfig
from mosaic_core.durable.manifest import replay
from mosaic_core.engine import keyframes as keyframes_module
from mosaic_core.engine.keyframe_store import UnknownKeyframeError, held_keyframes
from mosaic_core.engine.keyframes import KeyframePicker, parse_keyframe_id
from mosaic_core.engine.thumbnails import thumbnail
from mosaic_core.errors import ConfigError, InvalidArgumentError, UnknownClusterError
from tests.engine.engine_helpers import feed, make_engine


def _offer_all(picker: KeyframePicker, similarities: list[float | None]) -> list[int]:
    for i, similarity in enumerate(similarities):
        picker.offer(i, float(i), lambda: np.zeros((2, 2, 3), np.uint8), similarity)
    return [c.frame_index for c in picker.candidates()]


@pytest.mark.parametrize(
    ("count", "similarities", "kept"),
    [
        (3, [None, 0.5, 0.9, 0.7, 0.6], [0, 2, 4]),  # first, most central, last
        (3, [None], [0]),
        (3, [None, 0.5], [0, 1]),
        (2, [None, 0.9, 0.8, 0.1], [0, 3]),
        (1, [None, 0.4, 0.95, 0.3], [2]),
        (4, [None, 0.8, 0.2, 0.9, 0.1, 0.5], [0, 1, 3, 5]),
        (3, [None, 0.99, 0.5], [0, 1, 2]),  # the frame that was last stays when it is the most central
    ],
)
def test_a_picker_keeps_first_most_central_and_last(count, similarities, kept):
    picker = KeyframePicker("cam/c000000", count)
    assert _offer_all(picker, similarities) == kept
    # At most `count` thumbnails are held at any time, whatever the cluster's length.
    assert len(picker.candidates()) <= count


def test_a_picker_makes_thumbnails_only_of_frames_it_keeps():
    made = []
    picker = KeyframePicker("cam/c000000", 1)
    for i, similarity in enumerate([None, 0.9, 0.1, 0.2]):
        picker.offer(i, float(i), lambda i=i: made.append(i) or np.zeros((2, 2, 3), np.uint8), similarity)
    assert made == [0, 1]


@pytest.mark.parametrize(
    ("shape", "expected"), [((720, 1280), (90, 160)), ((480, 360), (160, 120)), ((90, 60), (90, 60))]
)
def test_thumbnails_fit_the_long_side(shape, expected):
    rgb = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    assert thumbnail(rgb, 160).shape == (*expected, 3)


@pytest.mark.parametrize(
    "bad", ["", "cam", "cam/c000001", "../etc/passwd/f1", "cam/f", "cam/f-1", "cam/f1/x", "/cam/f1", "cam/f1\n", 7]
)
def test_keyframe_ids_that_are_not_ids_are_refused(bad):
    assert parse_keyframe_id(bad) is None


def test_keyframe_ids_parse():
    assert parse_keyframe_id("cam-1.a_b/f42") == ("cam-1.a_b", 42)


@pytest.mark.parametrize(
    "field", ["keyframes_per_cluster", "keyframe_long_side_px", "keyframe_jpeg_quality", "keyframe_encode_threads"]
)
def test_bad_keyframe_settings_are_refused(field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**{field: -1})


def test_side_charges_count_in_the_tier_and_are_given_back():
    residency = ResidencyManager(TierBudgets(device_bytes=100, host_bytes=100, disk_bytes=0))
    assert residency.charge("a", Tier.HOST, 60)
    assert not residency.charge("b", Tier.HOST, 50)  # does not fit: nothing counted
    assert residency.used_bytes(Tier.HOST) == 60 and residency.charged_bytes(Tier.HOST) == 60
    residency.check_invariants()
    assert residency.discharge("a", Tier.HOST) == 60 and residency.discharge("a", Tier.HOST) == 0
    assert residency.used_bytes(Tier.HOST) == 0
    residency.check_invariants()


@pytest.fixture(scope="module")
def fed(tiny_model, bikes_frames):
    """One engine with 24 frames of bikes.mp4, for the tests that only read it."""
    engine = make_engine(tiny_model)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:24])
    return engine


def test_every_sealed_cluster_keeps_keyframes_inside_its_span(fed):
    engine = fed
    records = {r.cluster_id: r for r in engine.stream("cam").former.records() if r.sealed}
    assert len(records) >= 3
    total = 0
    for cluster_id, record in records.items():
        keyframes = engine.keyframes("cam", cluster_id=cluster_id)
        assert 1 <= len(keyframes) <= 3
        assert keyframes[0].frame_index == record.frame_indices[0]
        assert keyframes[-1].frame_index == record.frame_indices[-1]
        for keyframe in keyframes:
            assert record.start_s <= keyframe.timestamp_s <= record.end_s
            image = Image.open(io.BytesIO(keyframe.jpeg))
            assert image.format == "JPEG" and image.size == (keyframe.width, keyframe.height)
            assert max(image.size) == 160
            total += keyframe.num_bytes
    stats = engine.stats()
    assert stats.keyframe_bytes >= total > 0
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == stats.keyframe_bytes
    # By id, in the order asked; the newest is the forming cluster's last frame.
    some = [k.keyframe_id for k in engine.keyframes("cam", cluster_id=next(iter(records)))][::-1]
    assert [k.keyframe_id for k in engine.keyframes("cam", keyframe_ids=some)] == some
    (latest,) = engine.keyframes("cam", latest=True)
    assert latest.frame_index == engine.stream("cam").frames_ingested - 1


def test_evidence_spans_carry_their_keyframes(fed):
    engine = fed
    answer = engine.answer("cam", "what moved?", max_new_tokens=2)
    assert answer.evidence
    for span in answer.evidence:
        assert span.keyframe_ids
        for keyframe in engine.keyframes("cam", keyframe_ids=span.keyframe_ids):
            assert span.start_s <= keyframe.timestamp_s <= span.end_s
            assert keyframe.cluster_id == span.cluster_id


def test_bad_lookups_are_refused(fed):
    engine = fed
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        engine.keyframes("cam")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        engine.keyframes("cam", latest=True, cluster_id="cam/c000000")
    with pytest.raises(InvalidArgumentError, match="not a keyframe id"):
        engine.keyframes("cam", keyframe_ids=["../../etc/passwd"])
    with pytest.raises(InvalidArgumentError, match="not a keyframe id"):
        engine.keyframes("cam", keyframe_ids=["other/f1"])
    with pytest.raises(InvalidArgumentError, match="at most 64"):
        engine.keyframes("cam", keyframe_ids=[f"cam/f{i}" for i in range(65)])
    with pytest.raises(UnknownKeyframeError, match="cam/f999"):
        engine.keyframes("cam", keyframe_ids=["cam/f999"])
    with pytest.raises(UnknownClusterError, match="no cluster"):
        engine.keyframes("cam", cluster_id="cam/c999999")


def test_keyframes_go_with_retention_and_with_the_stream(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:24])
    store = held_keyframes(engine.stream("cam"))
    before = store.num_bytes
    dropped = engine.drop_clusters_before("cam", bikes_frames[12][0])
    assert dropped and store.num_bytes < before
    for cluster_id in dropped:
        assert store.of_cluster(cluster_id) == []
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == store.num_bytes
    engine.close_stream("cam")
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == 0
    engine.tiering.residency.check_invariants()


def test_a_cluster_sealed_by_a_checkpoint_and_then_dropped_leaves_no_keyframes(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:12])
    engine.checkpoint()  # frames after it start new clusters
    state = engine.stream("cam")
    last = state.former.records()[-1]
    ids = [k.keyframe_id for k in engine.keyframes("cam", cluster_id=last.cluster_id)]
    assert last.sealed and ids
    assert last.cluster_id in engine.drop_clusters_before("cam", bikes_frames[12][0])
    feed(engine, "cam", bikes_frames[12:13], batch=1)
    store = held_keyframes(state)
    assert store.of_cluster(last.cluster_id) == []  # the checkpoint's cluster was kept again, and charged
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == store.num_bytes
    with pytest.raises(UnknownKeyframeError):
        engine.keyframes("cam", keyframe_ids=ids[:1])


def test_merged_clusters_keep_both_keyframe_sets(tiny_model, bikes_frames):
    from mosaic_core.engine.maintenance import merge_clusters

    # One frame a cluster, so that two neighbours fit under the size cap together.
    engine = make_engine(tiny_model, formation=FormationConfig(max_tokens=48, min_similarity=1.0))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:10])
    state = engine.stream("cam")
    sealed = [r.cluster_id for r in state.former.records() if r.sealed and r.cluster_id in engine.tiering.residency]
    sealed = [c for c in sealed if c not in state.local_cluster_ids()]
    left, right = sealed[0], sealed[1]
    ids = [k.keyframe_id for c in (left, right) for k in engine.keyframes("cam", cluster_id=c)]
    merged = merge_clusters(engine.parts, state, left, right)
    assert [k.keyframe_id for k in engine.keyframes("cam", cluster_id=merged)] == ids
    assert {k.cluster_id for k in engine.keyframes("cam", keyframe_ids=ids)} == {merged}
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == held_keyframes(state).num_bytes


def test_keyframes_are_written_with_the_records_and_come_back(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:24])
    first.checkpoint()
    entries = replay(first.history.store.stream_dir("cam")).clusters
    assert entries and all(e.keyframes for e in entries.values())
    before = {cid: [(k.keyframe_id, k.jpeg) for k in first.keyframes("cam", cluster_id=cid)] for cid in entries}
    first.close()

    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    after = {cid: [(k.keyframe_id, k.jpeg) for k in second.keyframes("cam", cluster_id=cid)] for cid in entries}
    assert after == before
    assert second.tiering.residency.charged_bytes(Tier.DISK) == second.stats().keyframe_bytes > 0
    second.close_stream("cam")
    assert second.tiering.residency.charged_bytes(Tier.DISK) == 0
    second.close()


def test_a_keyframe_that_fails_its_crc_is_not_restored(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:24])
    first.checkpoint()
    stream_dir = first.history.store.stream_dir("cam")
    entries = replay(stream_dir).clusters
    first.close()
    damaged, entry = next(iter(entries.items()))
    path = stream_dir / entry.file
    data = bytearray(path.read_bytes())
    header_bytes = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_bytes])["keyframes"]["data_offsets"]
    data[8 + header_bytes + start + 100] ^= 0xFF  # one byte inside the first JPEG
    path.write_bytes(bytes(data))

    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    assert second.keyframes("cam", cluster_id=damaged) == []
    assert all(second.keyframes("cam", cluster_id=cid) for cid in entries if cid != damaged)
    second.close()


def test_no_keyframes_when_switched_off(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, keyframes_per_cluster=0)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:12])
    assert engine.keyframes("cam", latest=True) == []
    assert engine.stats().keyframe_bytes == 0


def test_keyframes_the_host_budget_cannot_hold_are_dropped_and_counted(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, host_budget_bytes=1024)  # no disk tier to spill to: no room for a thumbnail
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:12])
    stats = engine.stats()
    assert stats.keyframes_dropped > 0 and stats.keyframe_bytes == 0
    assert engine.tiering.residency.used_bytes(Tier.HOST) <= 1024
    engine.tiering.residency.check_invariants()
    # The count is the engine's since it started: a stream deleted keeps its drops in it (a metric counts its growth).
    engine.close_stream("cam")
    assert engine.stats().keyframes_dropped == stats.keyframes_dropped


def test_jpegs_encoded_off_the_engine_thread_are_the_ones_it_would_have_encoded(tiny_model, bikes_frames, monkeypatch):
    """With an encoder thread, sealed clusters' JPEGs are encoded on it, and every read sees the same keyframes,
    bytes and charges as with the engine thread encoding them itself."""
    encoded_on: list[str] = []
    real = keyframes_module.encode_jpeg

    def recorded(rgb, quality):
        encoded_on.append(threading.current_thread().name)
        time.sleep(0.01)  # slower than the engine seals clusters, so several wait to be kept at once
        return real(rgb, quality)

    monkeypatch.setattr(keyframes_module, "encode_jpeg", recorded)
    seen = {}
    for threads in (0, 1):
        encoded_on.clear()
        engine = make_engine(tiny_model, keyframe_encode_threads=threads, host_budget_bytes=6 * 1024)
        engine.open_stream("cam", fps=4.0)
        feed(engine, "cam", bikes_frames[:24])
        ingest_threads = set(encoded_on)
        sealed = [r.cluster_id for r in engine.stream("cam").former.records() if r.sealed]
        by_cluster = {cid: [(k.keyframe_id, k.jpeg) for k in engine.keyframes("cam", cluster_id=cid)] for cid in sealed}
        stats = engine.stats()
        seen[threads] = (by_cluster, stats.keyframe_bytes, stats.num_keyframes, stats.keyframes_dropped)
        engine.tiering.residency.check_invariants()
        engine.close()
        if threads:
            assert ingest_threads and all(name.startswith("mosaic-keyframes") for name in ingest_threads)
        else:
            assert ingest_threads == {threading.current_thread().name}
    assert len(seen[0][0]) >= 3
    assert seen[0][3] > 0, "the host budget must be small enough that some keyframes are dropped, in order"
    assert seen[1] == seen[0]


def test_a_forming_clusters_candidates_are_encoded_once():
    picker = KeyframePicker("cam/c000000", 3)
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i, similarity in enumerate([None, 0.5, 0.9]):
        picker.offer(i, float(i), lambda: rgb, similarity)
    first = picker.encode("cam", 75)
    assert [k.frame_index for k in first] == [0, 1, 2]
    again = picker.encode("cam", 75)
    assert all(a is b for a, b in zip(first, again, strict=True))  # the same objects: nothing re-encoded
    picker.offer(3, 3.0, lambda: rgb, 0.1)  # frame 2 stays as the most central, frame 3 is the new last
    assert [k.frame_index for k in picker.encode("cam", 75)] == [0, 2, 3]


def test_a_split_clusters_keyframes_go_to_the_half_holding_their_frame(tiny_model, bikes_frames):
    from mosaic_core.engine.splits import split_cluster

    engine = make_engine(tiny_model, formation=FormationConfig(max_tokens=96, min_similarity=-1.0, min_cohesion=-1.0))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])  # every frame joins until the cap: clusters of 5 frames
    state = engine.stream("cam")
    record = next(
        r for r in state.former.records()
        if r.sealed and r.num_frames > 2 and r.cluster_id not in state.local_cluster_ids()
    )  # fmt: skip
    ids = [k.keyframe_id for k in engine.keyframes("cam", cluster_id=record.cluster_id)]
    halves = split_cluster(engine.parts, state, record, record.frame_indices[2])
    records = state.records()
    moved = engine.keyframes("cam", keyframe_ids=ids)
    assert [k.keyframe_id for k in moved] == ids
    for keyframe in moved:
        assert keyframe.cluster_id in halves and keyframe.frame_index in records[keyframe.cluster_id].frame_indices
    assert engine.tiering.residency.charged_bytes(Tier.HOST) == held_keyframes(state).num_bytes


def test_clusters_waiting_for_a_stalled_encoder_are_bounded(tiny_model, bikes_frames):
    """An encoder slower than the seals holds the sealing thread back at MAX_ENCODING clusters a stream, rather than
    letting their thumbnails pile up."""
    from concurrent.futures import ThreadPoolExecutor

    from mosaic_core.engine.keyframe_store import MAX_ENCODING, KeyframeSettings, KeyframeStore

    release = threading.Event()
    encoder = ThreadPoolExecutor(1, thread_name_prefix="stalled-encoder")
    encoder.submit(release.wait, 30)  # the encoder's one thread is busy until released
    engine = make_engine(tiny_model)
    settings = KeyframeSettings(count=1, long_side_px=32, jpeg_quality=75, on_disk=False, encoder=encoder)
    store = KeyframeStore("cam", settings, engine.tiering)
    rgb = np.zeros((32, 32, 3), np.uint8)
    waiting = []

    def seal_many():
        for n in range(MAX_ENCODING + 3):
            store.offer(f"cam/c{n:06d}", n, float(n), lambda: rgb, None)
            waiting.append(len(store._encoding))

    sealing = threading.Thread(target=seal_many)
    sealing.start()
    sealing.join(1.0)
    try:
        assert sealing.is_alive(), "the seals went on past the bound while the encoder was stalled"
        assert max(waiting) == MAX_ENCODING
    finally:
        release.set()
        sealing.join(30)
        encoder.shutdown()
        engine.close()
    assert not sealing.is_alive() and store.num_keyframes == MAX_ENCODING + 2
