"""The upload ring: slices come from one segment until it is full, a reused segment waits for the fences of every
stream that read it, and on CUDA each device copy keeps its own values however often the ring wraps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.memory.upload_ring import RingSegments, UploadRing

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ring(num_segments: int = 4, segment_bytes: int = 1024) -> RingSegments:
    return RingSegments(capacity_bytes=num_segments * segment_bytes, num_segments=num_segments, align_bytes=256)


def test_slices_are_aligned_and_packed_until_the_segment_is_full():
    ring = _ring()
    taken = [ring.take(n, "s") for n in (1, 256, 257, 100)]
    assert [(t.segment, t.start_bytes, t.num_bytes) for t in taken[:3]] == [(0, 0, 256), (0, 256, 256), (0, 512, 512)]
    assert all(t.turn is None for t in taken[:3])
    assert (taken[3].segment, taken[3].start_bytes, taken[3].num_bytes) == (1, 1024, 256)  # 1024 + 256 > 1024
    assert taken[3].turn is not None and (taken[3].turn.closed, taken[3].turn.opened) == (0, 1)


def test_a_slice_that_exactly_fills_the_segment_stays_in_it():
    ring = _ring()
    assert ring.take(768, "s").turn is None
    last = ring.take(256, "s")
    assert (last.segment, last.start_bytes, last.turn) == (0, 768, None)
    assert ring.take(1, "s").turn is not None


@pytest.mark.parametrize("num_bytes, fits", [(1024, True), (1025, False), (4096, False)])
def test_a_slice_larger_than_a_segment_is_refused_and_moves_nothing(num_bytes, fits):
    ring = _ring()
    ring.take(300, "s")
    assert ring.can_take(num_bytes) is fits
    if not fits:
        assert ring.take(num_bytes, "s") is None
        assert (ring.open_segment, ring.offset_bytes) == (0, 512)


def test_the_ring_wraps_and_a_reused_segment_waits_for_the_fences_of_its_last_closing():
    ring = _ring(num_segments=3)
    turns = []
    for i in range(8):  # one full segment per take: a turn every time after the first
        taken = ring.take(1024, "s")
        assert taken.start_bytes == (i % 3) * 1024
        if taken.turn is not None:
            turns.append(taken.turn)
            ring.seal(taken.turn.closed, [f"fence {i}"])
    assert [(t.closed, t.opened) for t in turns] == [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2), (2, 0), (0, 1)]
    # segments 1 and 2 open fresh; from then on each opening waits for what sealed that segment at its last closing
    assert [t.wait_for for t in turns] == [[], [], ["fence 1"], ["fence 2"], ["fence 3"], ["fence 4"], ["fence 5"]]


def test_each_closing_names_the_streams_that_read_that_segment_since_it_was_opened():
    ring = _ring(num_segments=2)
    for reader in ("default", "side", "default"):
        ring.take(256, reader)
    turn = ring.take(1024, "side").turn  # closes segment 0
    assert turn.readers == ["default", "side"]
    ring.seal(turn.closed, ["f0 default", "f0 side"])
    turn = ring.take(256, "default").turn  # closes segment 1, read by "side" only, reopens 0
    assert (turn.closed, turn.readers, turn.wait_for) == (1, ["side"], ["f0 default", "f0 side"])
    ring.seal(turn.closed, ["f1 side"])
    turn = ring.take(1024, "other").turn  # segment 0 was reopened: only what read it since counts
    assert (turn.closed, turn.readers) == (0, ["default"])


def test_taking_again_before_the_closed_segment_is_sealed_is_a_broken_invariant():
    ring = _ring()
    ring.take(1024, "s")
    assert ring.take(1, "s").turn is not None
    with pytest.raises(AssertionError, match="never sealed"):
        ring.take(1, "s")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity_bytes": 4096, "num_segments": 1},
        {"capacity_bytes": 1000, "num_segments": 4},
        {"capacity_bytes": 4096, "num_segments": 4, "align_bytes": 100},
    ],
)
def test_bad_shapes_are_refused(kwargs):
    with pytest.raises(ValueError):
        RingSegments(**kwargs)


@needs_cuda
@pytest.mark.parametrize(
    "values, dtype",
    [
        ([[3, -1, 2**40], [0, 7, -(2**35)]], torch.int64),
        (np.arange(-50, 247, dtype=np.int64)[::3], torch.int32),  # strided, and cast on the way
        ([1, 0, 0, 1, 1, 0, 1], torch.bool),
        (np.linspace(-2.0, 3.0, 97), torch.float32),
        ([1.5, -2.25, 3.0], torch.bfloat16),  # no numpy dtype: a pinned block of its own
        (np.arange(5000, dtype=np.int64), torch.int64),  # larger than a segment: likewise
    ],
)
def test_uploads_equal_as_tensor(values, dtype):
    ring = UploadRing("cuda", capacity_bytes=4 * 8192, num_segments=4)
    ring.upload([9] * 3, torch.int64)  # the next slice starts past the first
    got = ring.upload(values, dtype)
    expected = torch.as_tensor(np.asarray(values), dtype=dtype)
    assert got.is_cuda and got.dtype == dtype
    assert torch.equal(got.cpu(), expected)


@needs_cuda
@pytest.mark.parametrize("busy", ["default", "side"])
def test_every_copy_keeps_its_values_while_the_ring_wraps_under_a_long_kernel(busy):
    ring = UploadRing("cuda", capacity_bytes=4 * 2048, num_segments=4)  # four 64-value int64 tables per segment
    side = torch.cuda.Stream()
    streams = {"default": torch.cuda.current_stream(), "side": side}
    side.wait_stream(streams["default"])
    a = torch.randn(2048, 2048, device="cuda")
    product = torch.empty_like(a)
    with torch.cuda.stream(streams[busy]):
        for _ in range(60):  # tens of milliseconds: the copies queued behind it wait, the host does not
            torch.mm(a, a, out=product)
    uploaded = []
    for i in range(200):  # 50 segments' worth: the ring wraps a dozen times
        with torch.cuda.stream(streams["default" if i % 2 else "side"]):
            uploaded.append(ring.upload(np.arange(64) + 1000 * i, torch.int64))
    torch.cuda.synchronize()
    for i, copy in enumerate(uploaded):
        assert torch.equal(copy.cpu(), torch.arange(64) + 1000 * i), f"upload {i} was overwritten"


@needs_cuda
def test_an_upload_captured_in_a_graph_does_not_read_the_ring():
    ring = UploadRing("cuda", capacity_bytes=4 * 2048, num_segments=4)
    ring.upload([1, 2, 3], torch.int64)
    where = (ring.segments.open_segment, ring.segments.offset_bytes)
    static = torch.zeros(64, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(ring.upload(np.arange(64) + 7, torch.int64))
    assert (ring.segments.open_segment, ring.segments.offset_bytes) == where
    for i in range(40):  # every segment of the ring written over, several times
        ring.upload(np.full(64, -i), torch.int64)
    static.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static.cpu(), torch.arange(64) + 7)
