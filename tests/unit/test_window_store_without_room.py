"""Frames leaving the local window when no tier has room for them stay in the window: their KV is never lost.

Storing them used to run after they had left the window, so a ``CapacityError`` there left their KV (and their
device pages) owned by neither the window nor a cluster.
"""

from __future__ import annotations

import errno
import time

import pytest

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import FrameInput
from mosaic_core.errors import CapacityError
from mosaic_core.memory.disk_tier import DiskTier
from services.engine_loop import EngineLoop
from services.ingest_queue import IngestQueues, QueuedFrame
from services.metadata import InMemoryMetadataStore
from services.publisher import MetadataPublisher, WorkerView
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync
from tests.engine.engine_helpers import feed, make_engine, spilling_to_disk
from tests.engine.room_helpers import HELD, fill_with_pinned, give_room_back, missing_tokens, unowned_device_pages


def _one_each(stream_ids, frame):
    return [FrameInput(stream_id, *frame) for stream_id in stream_ids]


@pytest.mark.parametrize("next_to_grow_too", [False, True], ids=["growing_one_unpinned", "all_pinned"])
def test_frames_that_find_no_room_to_leave_the_window_stay_in_it(tiny_model, bikes_frames, next_to_grow_too):
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:12])
    state = engine.stream("cam")
    assert missing_tokens(engine, "cam") == {}
    assert unowned_device_pages(engine) == 0
    fill_with_pinned(engine, next_to_grow_too=next_to_grow_too)
    window_before = [frame.frame_index for frame in state.local]

    result = engine.ingest([FrameInput("cam", *frame) for frame in bikes_frames[12:14]])

    assert "no room" in result.held_back["cam"]
    assert result.refused == {"cam": 1}  # one frame a pass: the second frame's pass would outgrow the window
    assert result.num_frames == 1 and state.frames_ingested == 13
    assert missing_tokens(engine, "cam") == {}
    assert unowned_device_pages(engine) == 0
    assert [frame.frame_index for frame in state.local][: len(window_before)] == window_before
    refused = engine.ingest([FrameInput("cam", *bikes_frames[13])])  # still no room: the next frames are refused
    assert (refused.num_frames, refused.refused) == (0, {"cam": 1})
    assert "takes no new frames" in refused.held_back["cam"]
    assert state.frames_ingested == 13
    assert missing_tokens(engine, "cam") == {}

    give_room_back(engine)
    feed(engine, "cam", bikes_frames[13:16])
    _checkpoint_loses_nothing(engine, state)


def _loop(engine) -> EngineLoop:
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))
    return EngineLoop(
        engine, IngestQueues(64), TierSync(engine, publisher, "0"), WorkerTelemetry("0"), max_batch_frames=8,
        retention_s=lambda stream_id: 0.0,
    )  # fmt: skip


def test_a_stream_holding_frames_back_leaves_the_others_their_call_and_their_tower_ahead(tiny_model, bikes_frames):
    """A stream whose frames still wait for room takes none of the call's frames in; the other streams' frames go
    in with the vision tower queued ahead for the whole batch, not a second tower after a retry."""
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    for stream_id in ("cam", "other"):
        engine.open_stream(stream_id, fps=2.0)
    feed(engine, "cam", bikes_frames[:12])
    feed(engine, "other", bikes_frames[:2])
    fill_with_pinned(engine)
    assert engine.ingest([FrameInput("cam", *bikes_frames[12])]).held_back.keys() == {"cam"}
    loop = _loop(engine)
    batch = [
        QueuedFrame("cam", *bikes_frames[13], time.monotonic()),
        QueuedFrame("other", *bikes_frames[2], time.monotonic()),
    ]
    encoded = engine.encode_ahead([FrameInput(f.stream_id, f.timestamp_s, f.rgb) for f in batch])

    ingested, used_ahead = loop.ingest_calls._ingest(batch, encoded)

    assert [f.stream_id for f in ingested] == ["other"] and used_ahead
    assert (engine.stream("cam").frames_ingested, engine.stream("other").frames_ingested) == (13, 3)
    delta = loop.telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None)
    assert delta.dropped == {("cam", "no_room"): 1}


def test_a_checkpoint_that_leaves_frames_in_a_window_says_so(tiny_model, bikes_frames):
    """A shutdown's checkpoint with frames that find no room raises, so the worker logs that they are not durable,
    rather than report every window flushed."""
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:12])
    fill_with_pinned(engine)

    with pytest.raises(CapacityError, match=r"streams \['cam'\], not durable"):
        engine.checkpoint()

    assert engine.stream("cam").local
    assert missing_tokens(engine, "cam") == {}
    give_room_back(engine)
    engine.checkpoint()
    assert not engine.stream("cam").local


def test_the_other_streams_frames_leave_their_windows(tiny_model, bikes_frames):
    """Only the stream whose cluster cannot grow (on a full host tier, everything there pinned) holds frames back,
    though it comes first in the pass; the other stream's cluster grows on the device, and its frames leave the
    window as usual."""
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    for stream_id in ("cam", "other"):
        engine.open_stream(stream_id, fps=2.0)
        feed(engine, stream_id, bikes_frames[:8])
    residency = engine.tiering.residency
    cam_grows = engine.stream("cam").local[0].cluster_id
    engine.tiering.execute(residency.plan_spill(cam_grows, Tier.HOST))
    for cluster_id in residency.tracked_ids():
        if residency.tier_of(cluster_id) == Tier.HOST:
            residency.pin(cluster_id)
    assert residency.charge(HELD, Tier.HOST, residency.free_bytes(Tier.HOST))

    result = engine.ingest(_one_each(("cam", "other"), bikes_frames[8]))

    assert result.held_back.keys() == {"cam"}
    assert result.num_frames == 2 and not result.refused
    window = engine.config.local_window_tokens
    assert engine.stream("cam").local_tokens > window >= engine.stream("other").local_tokens
    for stream_id in ("cam", "other"):
        assert missing_tokens(engine, stream_id) == {}
    assert unowned_device_pages(engine) == 0


def test_a_pass_that_finds_no_room_at_a_pause_still_places_its_other_rows(tiny_model, bikes_frames):
    """Frames leave the windows at a pause after each row; the row after a refused store is placed all the same,
    since its KV is already in pages the pass took."""
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    for stream_id in ("cam", "other"):
        engine.open_stream(stream_id, fps=2.0)
        feed(engine, stream_id, bikes_frames[:8])
    fill_with_pinned(engine)
    pauses = IngestPauses(lambda: None, every_layers=64, placed_frames=1)

    result = engine.ingest(_one_each(("cam", "other"), bikes_frames[8]), pauses=pauses)

    assert pauses.num_pauses >= 1
    assert result.held_back.keys() == {"cam", "other"}
    for stream_id in ("cam", "other"):
        assert engine.stream(stream_id).frames_ingested == 9
        assert missing_tokens(engine, stream_id) == {}
    assert unowned_device_pages(engine) == 0


def test_the_service_drops_the_frames_the_engine_did_not_take_in_as_no_room(tiny_model, bikes_frames):
    """The engine loop counts as ingested only the frames a call took in, and the rest as dropped for want of room,
    once each, without ingesting them again; the stream's next frames are refused and dropped the same way."""
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:12])
    fill_with_pinned(engine)
    loop = _loop(engine)
    loop.queues.add_stream("cam", 2.0)

    loop.ingest_calls._ingest_batch([QueuedFrame("cam", t, rgb, time.monotonic()) for t, rgb in bikes_frames[12:15]])

    assert engine.stream("cam").frames_ingested == 13
    delta = loop.telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None)
    assert delta.dropped == {("cam", "no_room"): 2}
    assert delta.ingested == {"cam": 1}

    loop.queues.put(QueuedFrame("cam", bikes_frames[15][0], bikes_frames[15][1], time.monotonic()))
    assert loop.ingest_calls.ingest_once()
    assert engine.stream("cam").frames_ingested == 13
    delta = loop.telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None)
    assert delta.dropped == {("cam", "no_room"): 1}
    assert missing_tokens(engine, "cam") == {}


def test_frames_whose_clusters_the_disk_refuses_stay_in_the_window_until_it_writes(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """A disk that refuses the spill making room for a frame's cluster (full) holds its stream back as no room
    does: the frame's KV and pages stay in its window, and no byte is counted for it; once the disk writes again
    the frames leave as usual. The error used to escape the call with the frame in neither window nor cluster."""
    engine = spilling_to_disk(tiny_model, tmp_path)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:20])
    state = engine.stream("cam")

    def disk_full(self, cluster_id, kv):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskTier, "write", disk_full)
    refused_at = None
    for i in range(20, 40):
        result = engine.ingest([FrameInput("cam", *bikes_frames[i])])
        engine.tiering.residency.check_invariants()
        if result.held_back:
            refused_at = i
            break
    assert refused_at is not None, "the tight budgets must spill to the disk within 20 frames"
    assert "No space left" in result.held_back["cam"]
    assert missing_tokens(engine, "cam") == {}
    assert unowned_device_pages(engine) == 0
    refused = engine.ingest([FrameInput("cam", *bikes_frames[refused_at + 1])])
    assert refused.refused == {"cam": 1} and "takes no new frames" in refused.held_back["cam"]

    monkeypatch.undo()
    feed(engine, "cam", bikes_frames[refused_at + 1 :])
    _checkpoint_loses_nothing(engine, state)


def _checkpoint_loses_nothing(engine, state) -> None:
    """A checkpoint empties the window into clusters, and every ingested frame's tokens are in one, pages owned."""
    engine.checkpoint()
    assert not state.local
    assert missing_tokens(engine, "cam") == {}
    assert unowned_device_pages(engine) == 0
    engine.tiering.residency.check_invariants()
    formed = sum(record.num_tokens for record in state.former.records_to_read())
    assert formed == state.frames_ingested * state.geometry.tokens_per_frame
