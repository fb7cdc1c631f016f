"""Formation's comparison of a frame with its stream's open cluster: from running sums, as from the members, and read
back without waiting for the work queued after it."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.engine.coherence import CoherenceReadback

DIM = 24


def _from_members(members: list[torch.Tensor], frame: torch.Tensor) -> tuple[float, float]:
    """Similarity to the centroid, and the members' mean cosine to the centroid with the frame added."""
    stacked = torch.stack(members).double()
    similarity = torch.nn.functional.cosine_similarity(frame.double(), stacked.mean(dim=0), dim=0)
    with_frame = torch.cat([stacked, frame.double()[None]])
    centroid = with_frame.mean(dim=0, keepdim=True)
    return float(similarity), float(torch.nn.functional.cosine_similarity(with_frame, centroid, dim=1).mean())


def test_running_sums_compare_as_the_members_would_for_every_row_at_once():
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(DIM, generator=generator) + 2.0 for _ in range(12)]
    scales = [0.5, 3.0, 1.0, 7.0]  # members of different lengths: cohesion is not a cosine of sums
    members = {"a": [], "b": [], "c": []}
    sums = {"a": None, "b": None, "c": None}
    joins = {"a": [True, True, True], "b": [True, False, True], "c": [False, False, False]}
    for step in range(4):
        streams = list(members)
        frames = [vectors[3 * step + i] * scales[i % 4] for i in range(3)]
        readback = CoherenceReadback([sums[s] for s in streams], frames)
        for row, (stream, frame, got) in enumerate(zip(streams, frames, readback.values(), strict=True)):
            if members[stream]:
                want = _from_members(members[stream], frame)
                assert all(abs(g - w) < 1e-5 for g, w in zip(got, want, strict=True)), (stream, step, got, want)
            else:
                assert got == (None, None)
            joined = step > 0 and joins[stream][step - 1]
            sums[stream] = readback.open_after(row, joined=joined)
            members[stream] = [*members[stream], frame] if joined else [frame]
            assert sums[stream].count == len(members[stream])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_readback_does_not_wait_for_work_queued_after_it():
    frame = torch.randn(64, device="cuda")
    start = CoherenceReadback([None], [frame])
    torch.cuda.synchronize()
    readback = CoherenceReadback([start.open_after(0, joined=False)], [torch.randn(64, device="cuda")])
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):  # tens to hundreds of milliseconds of matrix products, queued after the readback
        big = big @ big / 8192
    later = torch.cuda.Event()
    later.record()
    assert readback.values()[0][0] is not None
    assert not later.query()  # the values came back while the later work was still running
    torch.cuda.synchronize()
