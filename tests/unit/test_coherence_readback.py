"""Ingest reads the first frames' coherence back without waiting for the language model queued after it."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.engine.ingest import _coherence_on_device, _CoherenceReadback


def test_values_match_the_computation_and_skip_clusters_without_members():
    torch.manual_seed(0)
    members = [[torch.randn(8), torch.randn(8)], [], [torch.randn(8)]]
    frames = [torch.randn(8) for _ in members]
    values = _CoherenceReadback(members, frames).values()
    assert values[1] == (None, None)
    for m, f, got in zip(members, frames, values, strict=True):
        if m:
            assert got == pytest.approx(tuple(_coherence_on_device(m, f).tolist()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_readback_does_not_wait_for_work_queued_after_it():
    members, frames = [[torch.randn(64, device="cuda")]], [torch.randn(64, device="cuda")]
    torch.cuda.synchronize()
    readback = _CoherenceReadback(members, frames)
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):  # tens to hundreds of milliseconds of matrix products, queued after the readback
        big = big @ big / 8192
    later = torch.cuda.Event()
    later.record()
    assert readback.values()[0][0] is not None
    assert not later.query()  # the values came back while the later work was still running
    torch.cuda.synchronize()
