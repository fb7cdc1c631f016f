"""The shaping benchmark's probe spans: held-out spans are new frames, never a span asked before them."""

from __future__ import annotations

from mosaic_core.bench.shaping import HELD_OUT, probe_sets


def test_held_out_spans_share_no_frame_with_the_probed_ones() -> None:
    sets = probe_sets(loop_frames=40, stored_frames=155, span_frames=2, num=4)
    asked = {f for (first, last), _ in sets["single"] for f in range(first, last + 1)}
    held_out = [range(first, last + 1) for (first, last), _ in sets[HELD_OUT]]
    assert len(held_out) == 4
    assert all(len(span) == 2 and not asked & set(span) for span in held_out), (sets["single"], held_out)
    assert all(span[0] >= 0 and span[-1] < 40 for span in held_out)
